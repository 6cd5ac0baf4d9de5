//! vip-agent as a library: the loader and map writer shared by the agent binary, the tests and
//! the benchmarks, so all of them drive the datapath through the same code.

pub mod dataplane;
pub mod object;
pub mod tables;
