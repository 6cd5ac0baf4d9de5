//! Source NAT rules in the kernel's nf_tables, written over netlink (no `nft` binary needed).
//!
//! vip owns one table, `inet vip`, with one chain, `egress` (nat, postrouting, priority srcnat).
//! Every change replaces the whole table in one nf_tables transaction (add, delete, add it
//! again with its rules), so the kernel never runs a half-written rule set; the bindings of
//! connections already translated live in conntrack and are not touched.

use std::{io, net::IpAddr};

/// The table vip owns (family `inet`).
pub const TABLE: &str = "vip";
/// Its one chain.
pub const CHAIN: &str = "egress";

/// One rule: packets of `protocol` from `source` leave with source `source` and a source port
/// (or ICMP echo identifier) in `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceNat {
    pub source: IpAddr,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_ICMP` or `IPPROTO_ICMPV6`.
    pub protocol: u8,
    pub first: u16,
    pub last: u16,
}

/// Why the rules could not be written.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("opening a netfilter netlink socket")]
    Socket(#[source] io::Error),
    #[error("talking to nf_tables")]
    Io(#[source] io::Error),
    #[error("nf_tables refused message {seq} of the transaction")]
    Refused {
        seq: u32,
        #[source]
        source: io::Error,
    },
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: u32 = 100;
const NFTA_LIST_ELEM: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// Registers: 16 bytes each, enough for an IPv6 address.
const REG_MATCH: u32 = 1;
const REG_ADDR: u32 = 2;
const REG_PORT_MIN: u32 = 3;
const REG_PORT_MAX: u32 = 4;

/// Replaces vip's table with one holding `rules` (none: the table goes).
pub fn replace(rules: &[SourceNat]) -> Result<(), NatError> {
    let mut batch = Batch::default();
    // Adding first makes the delete valid whether or not the table existed.
    batch.message(NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs());
    batch.message(NFT_MSG_DELTABLE, 0, table_attrs());
    if !rules.is_empty() {
        batch.message(NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs());
        batch.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, chain_attrs());
        for rule in rules {
            batch.message(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                rule_attrs(rule),
            );
        }
    }
    batch.send()
}

fn table_attrs() -> Vec<u8> {
    let mut a = Vec::new();
    attr(&mut a, 1, &cstr(TABLE)); // NFTA_TABLE_NAME
    a
}

fn chain_attrs() -> Vec<u8> {
    let mut hook = Vec::new();
    attr(&mut hook, 1, &NF_INET_POST_ROUTING.to_be_bytes()); // NFTA_HOOK_HOOKNUM
    attr(&mut hook, 2, &NF_IP_PRI_NAT_SRC.to_be_bytes()); // NFTA_HOOK_PRIORITY
    let mut a = Vec::new();
    attr(&mut a, 1, &cstr(TABLE)); // NFTA_CHAIN_TABLE
    attr(&mut a, 3, &cstr(CHAIN)); // NFTA_CHAIN_NAME
    attr(&mut a, 4 | NLA_F_NESTED, &hook); // NFTA_CHAIN_HOOK
    attr(&mut a, 7, &cstr("nat")); // NFTA_CHAIN_TYPE
    a
}

/// `meta nfproto F meta l4proto P ip(6) saddr S snat ip(6) to S:FIRST-LAST`.
fn rule_attrs(rule: &SourceNat) -> Vec<u8> {
    let (family, addr, saddr_offset): (u8, Vec<u8>, u32) = match rule.source {
        IpAddr::V4(a) => (NFPROTO_IPV4, a.octets().to_vec(), 12),
        IpAddr::V6(a) => (NFPROTO_IPV6, a.octets().to_vec(), 8),
    };
    let mut exprs = Vec::new();
    // meta nfproto == family
    expr(
        &mut exprs,
        "meta",
        &[
            (1, REG_MATCH.to_be_bytes().to_vec()),
            (2, 15u32.to_be_bytes().to_vec()),
        ],
    );
    cmp_eq(&mut exprs, &[family]);
    // meta l4proto == protocol
    expr(
        &mut exprs,
        "meta",
        &[
            (1, REG_MATCH.to_be_bytes().to_vec()),
            (2, 16u32.to_be_bytes().to_vec()),
        ],
    );
    cmp_eq(&mut exprs, &[rule.protocol]);
    // network header saddr == source
    let len = addr.len() as u32;
    expr(
        &mut exprs,
        "payload",
        &[
            (1, REG_MATCH.to_be_bytes().to_vec()),
            (2, 1u32.to_be_bytes().to_vec()), // NFT_PAYLOAD_NETWORK_HEADER
            (3, saddr_offset.to_be_bytes().to_vec()),
            (4, len.to_be_bytes().to_vec()),
        ],
    );
    cmp_eq(&mut exprs, &addr);
    immediate(&mut exprs, REG_ADDR, &addr);
    immediate(&mut exprs, REG_PORT_MIN, &rule.first.to_be_bytes());
    immediate(&mut exprs, REG_PORT_MAX, &rule.last.to_be_bytes());
    expr(
        &mut exprs,
        "nat",
        &[
            (1, 0u32.to_be_bytes().to_vec()), // NFT_NAT_SNAT
            (2, u32::from(family).to_be_bytes().to_vec()),
            (3, REG_ADDR.to_be_bytes().to_vec()),
            (4, REG_ADDR.to_be_bytes().to_vec()),
            (5, REG_PORT_MIN.to_be_bytes().to_vec()),
            (6, REG_PORT_MAX.to_be_bytes().to_vec()),
        ],
    );
    let mut a = Vec::new();
    attr(&mut a, 1, &cstr(TABLE)); // NFTA_RULE_TABLE
    attr(&mut a, 2, &cstr(CHAIN)); // NFTA_RULE_CHAIN
    attr(&mut a, 4 | NLA_F_NESTED, &exprs); // NFTA_RULE_EXPRESSIONS
    a
}

/// One expression (`NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { attrs } }`).
fn expr(out: &mut Vec<u8>, name: &str, attrs: &[(u16, Vec<u8>)]) {
    let mut data = Vec::new();
    for (kind, value) in attrs {
        attr(&mut data, *kind, value);
    }
    let mut elem = Vec::new();
    attr(&mut elem, 1, &cstr(name)); // NFTA_EXPR_NAME
    attr(&mut elem, 2 | NLA_F_NESTED, &data); // NFTA_EXPR_DATA
    attr(out, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
}

/// `NFTA_DATA_VALUE` inside its nest.
fn data_value(value: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    attr(&mut d, 1, value);
    d
}

fn cmp_eq(out: &mut Vec<u8>, value: &[u8]) {
    let mut data = Vec::new();
    attr(&mut data, 1, &REG_MATCH.to_be_bytes()); // NFTA_CMP_SREG
    attr(&mut data, 2, &0u32.to_be_bytes()); // NFTA_CMP_OP: NFT_CMP_EQ
    attr(&mut data, 3 | NLA_F_NESTED, &data_value(value)); // NFTA_CMP_DATA
    nest_expr(out, "cmp", &data);
}

fn immediate(out: &mut Vec<u8>, register: u32, value: &[u8]) {
    let mut data = Vec::new();
    attr(&mut data, 1, &register.to_be_bytes()); // NFTA_IMMEDIATE_DREG
    attr(&mut data, 2 | NLA_F_NESTED, &data_value(value)); // NFTA_IMMEDIATE_DATA
    nest_expr(out, "immediate", &data);
}

fn nest_expr(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut elem = Vec::new();
    attr(&mut elem, 1, &cstr(name));
    attr(&mut elem, 2 | NLA_F_NESTED, data);
    attr(out, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netlink attribute, padded to 4 bytes.
fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (4 + value.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An nf_tables transaction: messages between BATCH_BEGIN and BATCH_END, each acknowledged.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Sequence numbers of the messages that ask for an acknowledgement.
    acked: Vec<u32>,
    seq: u32,
}

impl Batch {
    fn header(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, payload: &[u8]) {
        self.seq += 1;
        let len = (16 + 4 + payload.len()) as u32;
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&self.seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id (big-endian).
        self.bytes.push(family);
        self.bytes.push(0);
        self.bytes.extend_from_slice(&res_id.to_be_bytes());
        self.bytes.extend_from_slice(payload);
    }

    fn message(&mut self, kind: u16, flags: u16, attrs: Vec<u8>) {
        if self.bytes.is_empty() {
            self.header(
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            );
        }
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        self.header(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_INET,
            0,
            &attrs,
        );
        self.acked.push(self.seq);
    }

    /// Sends the transaction and waits for every acknowledgement; the first refusal fails it
    /// (the kernel then applies none of it).
    fn send(mut self) -> Result<(), NatError> {
        self.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let socket = Socket::open()?;
        socket.send(&self.bytes).map_err(NatError::Io)?;
        let mut pending = self.acked.len();
        let mut buf = vec![0u8; 64 * 1024];
        while pending > 0 {
            let n = socket.recv(&mut buf).map_err(NatError::Io)?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
                if len < 16 || at + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                    if code != 0 {
                        return Err(NatError::Refused {
                            seq,
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                    pending = pending.saturating_sub(1);
                }
                at += len.next_multiple_of(4);
            }
        }
        Ok(())
    }
}

/// A netfilter netlink socket, closed on drop.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> Result<Self, NatError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(NatError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid option of the right size; a receive timeout keeps a silent kernel
        // from hanging the agent.
        unsafe {
            libc::setsockopt(
                socket.fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(socket)
    }

    fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `bytes` and `kernel` are valid for the call.
        let sent = unsafe {
            libc::sendto(
                self.fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
