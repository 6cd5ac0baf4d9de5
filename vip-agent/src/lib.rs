//! vip-agent as a library: the agent's runtime and everything it drives, shared by the
//! `vip-agent` binary, the tests and the benchmarks, so all of them drive the datapath through
//! the same code.
//!
//! - [`runtime`]: the one task that owns the node's state, and its reload phases.
//! - [`apply`]: what the maps should hold, planned whole, then written.
//! - [`dataplane`]: loading, attaching, pins, map access, test runs.
//! - [`health`]: probes and the verdicts drawn from them.
//! - [`config`]: the config file, parsed and validated whole.
//! - [`control`]: the control socket's typed requests, server and client.
//! - [`bgp`]: the announce-only BGP speaker; [`bfd`]: fast failure detection toward its peers;
//!   `announce`: BGP or routes in a kernel table.
//! - [`net`]: next hops, `lo` addresses, source NAT, interface settings; [`egress`]: VIPs as
//!   backends' source (block rests, the source NAT each backend needs).
//! - [`sync`]: flow-state sharing with the tier's other LB nodes.
//! - [`metrics`], [`view`], [`inspect`]: what the agent shows; [`doctor`]: what the host lacks.

pub(crate) mod announce;
pub mod apply;
pub mod bfd;
pub mod bgp;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod doctor;
pub mod egress;
pub(crate) mod errors;
pub(crate) mod health;
pub mod inspect;
pub(crate) mod metrics;
pub mod net;
pub mod runtime;
pub mod sync;
pub mod view;
