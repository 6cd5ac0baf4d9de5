//! vip's BGP speaker: announces VIPs (host routes, next hop self) to routers, never installs
//! what it receives.

pub mod session;
pub mod wire;
