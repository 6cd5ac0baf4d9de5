//! vip-agent as a library: the loader and map writer shared by the agent binary, the tests and
//! the benchmarks, so all of them drive the datapath through the same code.

pub mod balancer;
pub mod bgp;
pub mod config;
pub mod datapath_log;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod lo;
pub mod metrics;
pub mod nexthop;
pub mod object;
pub mod probe;
pub mod sockopt;
pub mod tables;
