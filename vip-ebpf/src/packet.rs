//! Bounds-checked access to packet bytes: every read and write of the packet goes through here,
//! so the verifier always sees `data + off + size <= data_end` right before the access.

use aya_ebpf::programs::XdpContext;

/// Ether types as on the wire.
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

/// Header lengths, defined once for every program.
pub const ETH_LEN: usize = 14;
/// Ethernet header with one 802.1Q tag: the longest L2 header the programs accept.
pub const VLAN_ETH_LEN: usize = 18;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// ICMP and ICMPv6 error headers before the quoted packet.
pub const ICMP_LEN: usize = 8;

/// A pointer to a `T` at byte `off` of the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// A header of type `T` at byte `off`, read in place. `T` must have alignment 1 (byte arrays),
/// as every header type of this crate does.
#[inline(always)]
pub fn header<T>(ctx: &XdpContext, off: usize) -> Option<&'static T> {
    // SAFETY: `ptr_at` checked the bounds; packet memory stays valid and unmoved until
    // `bpf_xdp_adjust_head`, after which callers re-derive every header.
    ptr_at::<T>(ctx, off).map(|p| unsafe { &*p })
}

/// Reads a `T` (any alignment) at byte `off`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `off` are inside the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// Writes a `T` (any alignment) at byte `off`; `None` if the packet is too short.
#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, off: usize, value: T) -> Option<()> {
    // SAFETY: as in `read`; XDP packet data is writable.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.write_unaligned(value) })
}

/// Packet length in bytes.
#[inline(always)]
pub fn len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// `N` bytes of the packet from one offset, bounds-checked once: writes at constant offsets
/// inside it need no further check, neither for the verifier nor at run time.
pub struct Window<const N: usize>(*mut u8);

impl<const N: usize> Window<N> {
    /// The `N` bytes at `off`, if the packet is long enough.
    #[inline(always)]
    pub fn at(ctx: &XdpContext, off: usize) -> Option<Self> {
        ptr_at::<[u8; N]>(ctx, off).map(|p| Self(p.cast()))
    }

    /// Writes `value` (any alignment) at byte `at` of the window. Callers pass constant
    /// offsets, so the assertion folds away; one that failed would leave a reachable panic,
    /// which the verifier refuses at load.
    #[inline(always)]
    pub fn write<T: Copy>(&self, at: usize, value: T) {
        assert!(at + size_of::<T>() <= N);
        // SAFETY: `at` checked that the N bytes are in the packet, and the write is within them.
        unsafe { self.0.add(at).cast::<T>().write_unaligned(value) }
    }
}
