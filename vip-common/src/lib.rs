//! The contract between vip's XDP datapath and its agent.
//!
//! Everything that crosses the kernel/userspace boundary is defined here exactly once: map keys and
//! values (`#[repr(C)]`, explicit padding, bytemuck `Pod` so a padding mistake fails to compile),
//! map names and sizes, and the pure functions both sides must compute identically (the flow hash,
//! the IPv4 header checksum). The crate is `no_std`; the `user` feature adds aya's `Pod` impls and
//! the Maglev table builder for the agent.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod bench;
pub mod checksum;
pub mod conntrack;
pub mod hash;
pub mod layout;
pub mod maps;
pub mod outcome;

#[cfg(feature = "user")]
pub mod maglev;

pub use maps::*;
pub use outcome::Outcome;
