//! Map keys and values shared by the datapath and the agent, field by field.
//!
//! Conventions: addresses and ports are `[u8; N]` in network byte order (so `bpftool map dump`
//! shows them as the bytes on the wire); an IPv4 address fills the first 4 bytes of a 16-byte
//! address field and the rest is zero; every struct is `#[repr(C)]` with explicit `_pad` fields,
//! and `bytemuck::Pod` refuses to compile any implicit padding the kernel would see as garbage.

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers used in keys.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The address family tag stored in keys and backends (the IP version number).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrFamily {
    V4 = 4,
    V6 = 6,
}

/// Index into [`BACKENDS`](crate::layout::BACKENDS) and value of a Maglev slot.
pub type BackendId = u32;

/// A Maglev slot that maps to no backend: the VIP has no usable backend; packets are dropped and
/// counted (`drop_no_backend`).
pub const NO_BACKEND: BackendId = u32::MAX;

/// Key of `VIPS`: one service. A `port` of zero matches every port of the address.
/// 4-byte aligned so the datapath builds it with word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    /// VIP address, network order; IPv4 in bytes 0..4, rest zero.
    pub addr: [u8; 16],
    /// Destination port, network order; 0 = all ports.
    pub port: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`; an egress entry also has one of `IPPROTO_ICMP` /
    /// `IPPROTO_ICMPV6` (echo replies, the identifier taking the port's place).
    pub proto: u8,
    /// [`AddrFamily`] as a number (4 or 6).
    pub family: u8,
}

/// `VipMeta::flags`: hash on addresses only (source-IP affinity). Such a VIP also forwards IPv4
/// fragments, which all hash alike without ports.
pub const VIP_F_HASH_ADDRS_ONLY: u32 = 1 << 0;
/// `VipMeta::flags`: encapsulate with GUE (variant 1: UDP to `VipMeta::gue_port`, the client's IP
/// packet right after the UDP header) instead of IP-in-IP. The UDP source port carries the flow
/// hash so backends spread flows over their receive queues. Packets whose IPv6 UDP checksum
/// cannot be derived from headers (IPv4 UDP without checksum, fragments) go IP-in-IP.
pub const VIP_F_GUE: u32 = 1 << 1;

/// Value of `VIPS`, and of `VIP_META` at index `vip_id`: how to forward one VIP's packets.
/// Written by the agent; every decision that can be made ahead of time (outer source, hash
/// fields) is already resolved here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipMeta {
    /// The VIP itself. Established flows find their VIP's settings by `vip_id` (an array read)
    /// and must match this key: a conntrack entry of a removed VIP whose id was reused does not.
    pub vip: VipKey,
    /// Egress entries only (an all-ports key of an address whose backends use it as source):
    /// the first port of the egress range, host order. See [`VipMeta::egress_block`].
    pub egress_first: u16,
    /// Egress entries only: ports per backend block; 0 marks every other entry.
    pub egress_block_size: u16,
    /// Index into `VIP_META`; conntrack entries name their VIP by it.
    pub vip_id: u32,
    /// Which Maglev table slot is live: the table occupies `MAGLEV[table * M .. (table + 1) * M]`.
    /// The agent switches tables by rewriting this value (an atomic hash map update). An
    /// egress entry's slot holds its owner table instead: entry `b` is the backend that owns
    /// block `b` (`NO_BACKEND` for a free or resting block).
    pub table: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Port bits fed to the flow hash: `u32::MAX` (5-tuple) or `0` (addresses only).
    pub hash_port_mask: u32,
    /// UDP conntrack entries idle longer than this are ignored (the flow is re-hashed).
    pub udp_idle_ns: u64,
    /// Outer source address toward IPv4 backends, network order.
    pub src_v4: [u8; 4],
    /// Host bits of the VIP's IPv4 source prefix, network order: OR-ed with flow hash bits so
    /// backends see per-flow outer sources and spread them with RSS. Zero without a prefix.
    pub src_v4_entropy: [u8; 4],
    /// Outer source address toward IPv6 backends, network order.
    pub src_v6: [u8; 16],
    /// Host bits of the IPv6 source prefix within the address's last 4 bytes, network order.
    pub src_v6_entropy: [u8; 4],
    /// GUE destination port, network order (with `VIP_F_GUE`).
    pub gue_port: [u8; 2],
    /// Egress entries only: last port of the range minus the first (host order), so one
    /// wrapping compare tells whether a port is in the range.
    pub egress_span: u16,
}

impl VipMeta {
    /// For an egress entry, the block that destination port `port` (host order) falls in;
    /// `None` for other entries and for ports outside the egress range. Ports in the range
    /// lead to the block's owner with no conntrack and no hash, so every LB node agrees.
    #[inline(always)]
    pub fn egress_block(&self, port: u16) -> Option<u32> {
        let offset = port.wrapping_sub(self.egress_first);
        if self.egress_block_size == 0 || offset > self.egress_span {
            return None;
        }
        Some(u32::from(offset) / u32::from(self.egress_block_size))
    }
}

/// `Backend::flags`: the slot holds a backend (conntrack entries to an empty slot are ignored).
pub const BACKEND_F_PRESENT: u8 = 1 << 0;
/// `Backend::flags`: `ifindex`, `src_mac`, `dst_mac` hold a resolved next hop. Without it the
/// datapath asks `bpf_fib_lookup`.
pub const BACKEND_F_NEXTHOP: u8 = 1 << 1;

/// Health checks through the data path: the agent marks a probe socket's packets (to the VIP)
/// with `HEALTH_CHECK_MARK | BackendId`, and `vip_hc` (tc egress on `lo`, where packets to the
/// node's own VIPs go) encapsulates them toward that backend as the datapath would.
pub const HEALTH_CHECK_MARK: u32 = 0x7669_0000;
/// The bits of a packet mark that say "health check"; the rest is the [`BackendId`].
pub const HEALTH_CHECK_MARK_MASK: u32 = 0xffff_0000;

/// Value of `BACKENDS` (indexed by [`BackendId`]): one backend of one VIP, and where to send
/// its packets. A backend address serving several VIPs has one entry per VIP, so its health,
/// drain state and counters are per VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Backend address (outer destination), network order; IPv4 in bytes 0..4.
    pub addr: [u8; 16],
    /// [`AddrFamily`] of `addr`: decides IPv4 or IPv6 outer header.
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Which backend holds this id now ([`backend_tag`](crate::hash::backend_tag) of its VIP
    /// and address, never 0 from the agent). Ids are reused: a conntrack entry made for an
    /// earlier holder (`ConnEntry::backend_tag`) must not send its flow here.
    pub tag: u16,
    /// Egress interface of the resolved next hop; XDP_TX when it is the ingress interface.
    pub ifindex: u32,
    /// Next hop's MAC (the backend itself or the gateway toward it).
    pub dst_mac: [u8; 6],
    /// MAC of `ifindex`.
    pub src_mac: [u8; 6],
    /// `VipMeta::vip_id` of the VIP this entry belongs to (for the agent; the datapath does
    /// not read it).
    pub vip_id: u32,
}

/// A flow as the client sent it (source = client, destination = VIP): the flow hash input, and
/// the key of `CT_TABLE_V6` for IPv6 flows (IPv4 flows use [`FlowKeyV4`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Client address, network order.
    pub src: [u8; 16],
    /// VIP address, network order.
    pub dst: [u8; 16],
    /// Client port, network order (0 for fragments of an addresses-only VIP).
    pub src_port: [u8; 2],
    /// VIP port, network order.
    pub dst_port: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// [`AddrFamily`] as a number.
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// An all-zero key of the given family and protocol, to be filled in.
    #[inline(always)]
    pub const fn zeroed_for(family: AddrFamily, proto: u8) -> Self {
        Self {
            src: [0; 16],
            dst: [0; 16],
            src_port: [0; 2],
            dst_port: [0; 2],
            proto,
            family: family as u8,
            _pad: [0; 2],
        }
    }

    /// An IPv4 flow; ports are filled in by [`FlowKey::set_ports`]. Built from whole 64-bit words: the
    /// datapath then writes five words instead of zeroing address tails byte by byte.
    #[inline(always)]
    pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        let tail = u64::from_le_bytes([0, 0, 0, 0, proto, AddrFamily::V4 as u8, 0, 0]);
        bytemuck::cast([
            u64::from(u32::from_le_bytes(src)),
            0,
            u64::from(u32::from_le_bytes(dst)),
            0,
            tail,
        ])
    }

    /// Sets the ports. The key's last word (ports, protocol, family) is written whole: the
    /// datapath hashes and compares keys by words, and a word read of fields just stored one at
    /// a time waits until those stores complete (a failed store-to-load forward, which cost an
    /// IPv6 packet a tenth of its time in the datapath).
    #[inline(always)]
    pub fn set_ports(&mut self, src: [u8; 2], dst: [u8; 2]) {
        let last = [
            src[0],
            src[1],
            dst[0],
            dst[1],
            self.proto,
            self.family,
            0,
            0,
        ];
        bytemuck::cast_mut::<Self, [u64; 5]>(self)[4] = u64::from_ne_bytes(last);
    }

    /// An IPv6 flow; ports are filled in by [`FlowKey::set_ports`].
    #[inline(always)]
    pub fn v6(src: [u8; 16], dst: [u8; 16], proto: u8) -> Self {
        // From whole words, as `v4`: the datapath builds one per IPv6 packet.
        let half = |a: &[u8; 16], at: usize| {
            u64::from_le_bytes([
                a[at],
                a[at + 1],
                a[at + 2],
                a[at + 3],
                a[at + 4],
                a[at + 5],
                a[at + 6],
                a[at + 7],
            ])
        };
        let tail = u64::from_le_bytes([0, 0, 0, 0, proto, AddrFamily::V6 as u8, 0, 0]);
        bytemuck::cast([
            half(&src, 0),
            half(&src, 8),
            half(&dst, 0),
            half(&dst, 8),
            tail,
        ])
    }
}

/// Key of `CT_TABLE_V4`: an IPv4 flow as the client sent it. IPv4 flows have their own table
/// because a lookup hashes and compares the whole key: 16 bytes here, 40 in a [`FlowKey`],
/// which has room for IPv6 addresses.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKeyV4 {
    /// Client address, network order.
    pub src: [u8; 4],
    /// VIP address, network order.
    pub dst: [u8; 4],
    /// Client port, network order.
    pub src_port: [u8; 2],
    /// VIP port, network order.
    pub dst_port: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKeyV4 {
    /// The key of an IPv4 `flow`.
    #[inline(always)]
    pub fn of(flow: &FlowKey) -> Self {
        // From whole words: a field-wise build zeroes `_pad` with a call to `memset` in BPF.
        let word = |b: [u8; 4]| u32::from_ne_bytes(b);
        bytemuck::cast([
            word([flow.src[0], flow.src[1], flow.src[2], flow.src[3]]),
            word([flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]]),
            word([
                flow.src_port[0],
                flow.src_port[1],
                flow.dst_port[0],
                flow.dst_port[1],
            ]),
            word([flow.proto, 0, 0, 0]),
        ])
    }

    /// The flow this key was made of.
    pub fn flow(&self) -> FlowKey {
        let mut flow = FlowKey::v4(self.src, self.dst, self.proto);
        flow.set_ports(self.src_port, self.dst_port);
        flow
    }
}

/// The entry of a flow in a conntrack table (see [`crate::conntrack`]): the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnEntry {
    pub backend: BackendId,
    /// `VipMeta::vip_id` of the flow's VIP: established packets read its settings from
    /// `VIP_META` instead of looking the VIP up by key.
    pub vip_id: u32,
    /// `bpf_ktime_get_coarse_ns` when the entry was made or last read from the table (at least
    /// once per flow-cache refresh while the flow is active): UDP idle expiry, and which of a
    /// bucket's ways a new flow replaces.
    pub last_seen_ns: u64,
    /// `flow_hash` of the flow when the entry was made: established packets take their outer
    /// source entropy, flow label and GUE port from here instead of hashing every packet.
    pub flow_hash: u32,
    /// `Backend::tag` of `backend` when the entry was made: the entry counts only while the
    /// same backend holds that id. 0 (entries of agents before tags) matches any holder.
    pub backend_tag: u16,
    /// `CONN_F_*` bits; the datapath writes 0 and does not read them.
    pub flags: u16,
}

/// `ConnEntry::flags`: written by the agent from a peer LB node's flow state (`[sync]`).
pub const CONN_F_PEER: u16 = 1 << 0;

/// Value of `BACKEND_STATS` (per CPU): traffic sent to a backend of a VIP. A VIP's traffic is
/// the sum over its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Bytes of the client's IP packets (inner packets, without encapsulation).
    pub bytes: u64,
}

impl core::ops::AddAssign for TrafficCounters {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Value of `STATS` (per CPU, one entry): what happened to every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathStats {
    /// Not for a VIP (or not IP/TCP/UDP): passed to the stack untouched.
    pub passed: u64,
    /// Encapsulated and sent with XDP_TX.
    pub tx: u64,
    /// Encapsulated and redirected to another interface.
    pub redirected: u64,
    /// Encapsulated toward a backend without a resolved next hop, and the kernel's FIB has no
    /// neighbour entry for it yet: passed to the stack, which resolves the neighbour.
    pub no_neighbour_passed: u64,
    /// As above, but the FIB has no route to the backend, or the ingress interface does not
    /// forward (`net.ipv4.conf.IFACE.forwarding=0`): passed (the stack drops it too).
    pub no_route_passed: u64,
    /// A conntrack entry chose the backend.
    pub conntrack_hit: u64,
    /// Maglev chose the backend (and a conntrack entry was written, unless skipped below).
    pub conntrack_miss: u64,
    /// New flows forwarded without a conntrack entry: this CPU's insert budget for the
    /// current window was spent (a flood of new flows).
    pub conntrack_insert_skipped: u64,
    /// ICMP "fragmentation needed" / "packet too big" forwarded to the flow's backend.
    pub icmp_too_big: u64,
    /// IPv4 fragment to a VIP that hashes on ports.
    pub drop_fragment: u64,
    /// IPv4 packet with options to a VIP.
    pub drop_ip_options: u64,
    /// Packet to a VIP with inconsistent lengths or a truncated transport header.
    pub drop_malformed: u64,
    /// VIP without a usable backend.
    pub drop_no_backend: u64,
    /// `bpf_xdp_adjust_head` failed (no headroom).
    pub drop_no_headroom: u64,
}

/// Key of the decapsulation program's `DECAP_LOCAL` (the backend's own addresses, the outer
/// destinations it accepts) and `DECAP_VIPS` (the VIPs it serves, the inner destinations).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AddrKey {
    /// Address, network order; IPv4 in bytes 0..4, rest zero.
    pub addr: [u8; 16],
    /// [`AddrFamily`] as a number.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of the decapsulation program's `DECAP_CONFIG` (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DecapConfig {
    /// UDP port of GUE packets to decapsulate, network order; zero: GUE off.
    pub gue_port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of `DECAP_STATS` (per CPU, one entry): what the backend's decapsulation program did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DecapStats {
    /// Not encapsulated (or not IP): passed untouched.
    pub passed: u64,
    /// Outer header stripped, inner packet passed to the stack.
    pub decapsulated: u64,
    /// Encapsulated, but the outer destination is not one of this backend's addresses: passed
    /// untouched.
    pub refused_not_local: u64,
    /// Encapsulated to this backend, but the inner destination is not one of its VIPs: passed
    /// untouched (the stack drops it: it has no tunnel device).
    pub refused_not_vip: u64,
    /// Inner header truncated: passed untouched.
    pub refused_malformed: u64,
}

/// Value of `DATAPATH_CONFIG` (one entry): node-wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// Maglev table size M (prime); every table slot holds M entries.
    pub table_size: u32,
    /// New conntrack entries each CPU may make per [`INSERT_WINDOW_SHIFT`] window; 0: no
    /// limit. Beyond it, new flows are still forwarded (Maglev) but not recorded, so a flood
    /// of new flows (spoofed ACKs, UDP) cannot push the established ones out of conntrack
    /// faster than this.
    pub conntrack_inserts_per_window: u32,
}

/// The conntrack insert budget's window: `ktime >> 20`, about 1.05 ms (a shift, not a divide).
pub const INSERT_WINDOW_SHIFT: u32 = 20;

/// Value of `INSERT_BUDGET` (per CPU): inserts made in the current window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct InsertBudget {
    /// `ktime >> INSERT_WINDOW_SHIFT` of the window being counted.
    pub window: u64,
    pub used: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: each type is `#[repr(C)]`, `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DatapathStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecapStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecapConfig {}

    impl AddrKey {
        pub fn new(addr: IpAddr) -> Self {
            let (addr, family) = addr_bytes(addr);
            Self {
                addr,
                family: family as u8,
                _pad: [0; 3],
            }
        }
    }

    use std::net::{IpAddr, SocketAddr};

    /// An address as the 16 network-order bytes and family tag that map types store.
    pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], AddrFamily) {
        let mut out = [0u8; 16];
        match addr {
            IpAddr::V4(a) => {
                out[..4].copy_from_slice(&a.octets());
                (out, AddrFamily::V4)
            }
            IpAddr::V6(a) => (a.octets(), AddrFamily::V6),
        }
    }

    /// The address stored in a map's 16 bytes with a family tag; `None` for an unknown tag.
    pub fn addr_from_bytes(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
        match family {
            4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
            6 => Some(IpAddr::from(*bytes)),
            _ => None,
        }
    }

    impl FlowKey {
        /// The flow from `client` to `vip`: an IPv4 key when both are IPv4 addresses.
        pub fn between(client: SocketAddr, vip: SocketAddr, proto: u8) -> Self {
            let mut flow = match (client.ip(), vip.ip()) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => Self::v4(src.octets(), dst.octets(), proto),
                (src, dst) => Self::v6(addr_bytes(src).0, addr_bytes(dst).0, proto),
            };
            flow.set_ports(client.port().to_be_bytes(), vip.port().to_be_bytes());
            flow
        }
    }

    impl VipKey {
        pub fn new(addr: IpAddr, proto: u8, port: u16) -> Self {
            let (addr, family) = addr_bytes(addr);
            Self {
                addr,
                port: port.to_be_bytes(),
                proto,
                family: family as u8,
            }
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_bytes, addr_from_bytes};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ports_writes_the_ports_and_keeps_protocol_and_family() {
        let mut flow = FlowKey::v6([1; 16], [2; 16], IPPROTO_UDP);
        flow.set_ports([0x9c, 0x40], [0, 53]);
        assert_eq!((flow.src_port, flow.dst_port), ([0x9c, 0x40], [0, 53]));
        assert_eq!(
            (flow.proto, flow.family),
            (IPPROTO_UDP, AddrFamily::V6 as u8)
        );
        assert_eq!((flow.src, flow.dst, flow._pad), ([1; 16], [2; 16], [0; 2]));
    }

    #[test]
    fn egress_blocks_cover_the_range_and_nothing_else() {
        let mut meta: VipMeta = Zeroable::zeroed();
        assert_eq!(meta.egress_block(0), None, "not an egress entry");
        meta.egress_first = 40_000;
        meta.egress_span = 999;
        meta.egress_block_size = 100;
        assert_eq!(meta.egress_block(39_999), None);
        assert_eq!(meta.egress_block(40_000), Some(0));
        assert_eq!(meta.egress_block(40_099), Some(0));
        assert_eq!(meta.egress_block(40_100), Some(1));
        assert_eq!(meta.egress_block(40_999), Some(9));
        assert_eq!(meta.egress_block(41_000), None);
        assert_eq!(
            meta.egress_block(80),
            None,
            "below the range wraps past the span"
        );
        meta.egress_first = 65_000;
        meta.egress_span = 535;
        assert_eq!(meta.egress_block(65_535), Some(5));
    }

    #[test]
    fn ipv4_conntrack_key_keeps_the_five_tuple() {
        let mut flow = FlowKey::v4([198, 18, 0, 7], [198, 18, 100, 1], IPPROTO_UDP);
        flow.src_port = 40000u16.to_be_bytes();
        flow.dst_port = 53u16.to_be_bytes();
        let key = FlowKeyV4::of(&flow);
        assert_eq!(
            (
                key.src,
                key.dst,
                key.src_port,
                key.dst_port,
                key.proto,
                key._pad
            ),
            (
                [198, 18, 0, 7],
                [198, 18, 100, 1],
                flow.src_port,
                flow.dst_port,
                IPPROTO_UDP,
                [0; 3]
            )
        );
        assert_eq!(key.flow(), flow);
    }

    #[test]
    fn flow_keys_built_from_words_hold_their_fields() {
        let src: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let dst: [u8; 16] = core::array::from_fn(|i| 0xf0 - i as u8);
        let want = FlowKey {
            src,
            dst,
            ..FlowKey::zeroed_for(AddrFamily::V6, IPPROTO_TCP)
        };
        assert_eq!(FlowKey::v6(src, dst, IPPROTO_TCP), want);
        let want = FlowKey {
            src: [198, 18, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..FlowKey::zeroed_for(AddrFamily::V4, IPPROTO_UDP)
        };
        assert_eq!(
            FlowKey::v4([198, 18, 0, 7], [198, 18, 100, 1], IPPROTO_UDP),
            want
        );
    }
}
