//! The client's packet as parsing found it and as the outer header must describe it.

use vip_common::{AddrFamily, IPPROTO_IPIP, IPPROTO_IPV6};

/// The client's packet as the outer header must describe it.
#[derive(Clone, Copy)]
pub(crate) struct Inner {
    /// Length of the client's IP packet (its own length field, already validated).
    pub len: u16,
    /// IPv4 TOS or IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    pub family: AddrFamily,
}

impl Inner {
    #[inline(always)]
    pub(crate) fn outer_proto(&self) -> u8 {
        match self.family {
            AddrFamily::V4 => IPPROTO_IPIP,
            AddrFamily::V6 => IPPROTO_IPV6,
        }
    }
}
