//! BGP-4 wire format for an announce-only speaker (RFC 4271, 4760, 6793, 1997, 8092, 2918, 5492,
//! 4724 and 8538).
//!
//! Everything received is checked here before anything interprets it: the header (marker,
//! length 19..=4096, type), then the body by type, by pattern matching that cannot read out of
//! bounds. An OPEN yields what vip uses (ASN, hold time, identifier, 4-octet AS, route refresh,
//! unicast families); other capabilities are skipped, as RFC 5492 says. Received UPDATEs are
//! never decoded (vip installs no routes), only their two length fields are checked. What we send
//! is encoded here too, OPEN and UPDATE alike.
//!
//! Every malformed input maps to the NOTIFICATION (code, subcode) RFC 4271 section 6 asks for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Message types.
pub const OPEN: u8 = 1;
pub const UPDATE: u8 = 2;
pub const NOTIFICATION: u8 = 3;
pub const KEEPALIVE: u8 = 4;
pub const ROUTE_REFRESH: u8 = 5;

/// NOTIFICATION error codes and the subcodes we send (RFC 4271 section 4.5, RFC 4486).
pub mod code {
    pub const MESSAGE_HEADER: u8 = 1;
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;

    pub const OPEN_MESSAGE: u8 = 2;
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;

    pub const UPDATE_MESSAGE: u8 = 3;
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;

    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;

    pub const CEASE: u8 = 6;
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const CONNECTION_COLLISION: u8 = 7;
    /// RFC 8538: a reset the peer must not treat as a graceful restart.
    pub const HARD_RESET: u8 = 9;
}

/// A NOTIFICATION, sent or received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: &[u8]) -> Self {
        Self {
            code,
            subcode,
            data: data.to_vec(),
        }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.code, self.subcode) {
            (1, 1) => "message header: connection not synchronized",
            (1, 2) => "message header: bad message length",
            (1, 3) => "message header: bad message type",
            (2, 1) => "OPEN: unsupported version number",
            (2, 2) => "OPEN: bad peer AS",
            (2, 3) => "OPEN: bad BGP identifier",
            (2, 4) => "OPEN: unsupported optional parameter",
            (2, 6) => "OPEN: unacceptable hold time",
            (2, _) => "OPEN message error",
            (3, _) => "UPDATE message error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 7) => "cease: connection collision resolution",
            (6, _) => "cease",
            _ => "unknown error",
        };
        write!(f, "{what} ({}/{})", self.code, self.subcode)
    }
}

/// What a peer's OPEN says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The real ASN (from the 4-octet AS capability when present).
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub four_octet_as: bool,
    pub route_refresh: bool,
    pub ipv4_unicast: bool,
    pub ipv6_unicast: bool,
    /// The peer advertised graceful restart with the N bit (RFC 8538): a NOTIFICATION other
    /// than Cease / Hard Reset starts a graceful restart, as a closed connection does.
    pub graceful_notification: bool,
}

/// A received message, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    /// A well-framed UPDATE; its content is of no interest to an announce-only speaker.
    Update,
    Notification(Notification),
    Keepalive,
    RouteRefresh {
        afi: u16,
        safi: u8,
    },
}

/// Checks a message header; returns (type, body length).
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(u8, usize), Notification> {
    if header[..16] != [0xff; 16] {
        return Err(Notification::new(
            code::MESSAGE_HEADER,
            code::CONNECTION_NOT_SYNCHRONIZED,
            &[],
        ));
    }
    let len = u16::from_be_bytes([header[16], header[17]]);
    let kind = header[18];
    let min = match kind {
        OPEN => HEADER_LEN + 10,
        UPDATE => HEADER_LEN + 4,
        NOTIFICATION => HEADER_LEN + 2,
        KEEPALIVE => HEADER_LEN,
        ROUTE_REFRESH => HEADER_LEN + 4,
        _ => {
            return Err(Notification::new(
                code::MESSAGE_HEADER,
                code::BAD_MESSAGE_TYPE,
                &[kind],
            ));
        }
    };
    let bad_length = (len as usize) < min
        || len as usize > MAX_MESSAGE_LEN
        || (kind == KEEPALIVE && len as usize != HEADER_LEN)
        || (kind == ROUTE_REFRESH && len as usize != HEADER_LEN + 4);
    if bad_length {
        return Err(Notification::new(
            code::MESSAGE_HEADER,
            code::BAD_MESSAGE_LENGTH,
            &len.to_be_bytes(),
        ));
    }
    Ok((kind, len as usize - HEADER_LEN))
}

/// Decodes a message body of type `kind`; any body, however short, is refused or decoded,
/// never read out of bounds.
pub fn decode_body(kind: u8, body: &[u8]) -> Result<Message, Notification> {
    let too_short = || Notification::new(code::MESSAGE_HEADER, code::BAD_MESSAGE_LENGTH, &[]);
    match kind {
        OPEN => decode_open(body).map(Message::Open),
        UPDATE => check_update(body).map(|()| Message::Update),
        NOTIFICATION => match body {
            [code, subcode, data @ ..] => Ok(Message::Notification(Notification::new(
                *code, *subcode, data,
            ))),
            _ => Err(too_short()),
        },
        KEEPALIVE => Ok(Message::Keepalive),
        ROUTE_REFRESH => match body {
            [a, b, _, safi] => Ok(Message::RouteRefresh {
                afi: u16::from_be_bytes([*a, *b]),
                safi: *safi,
            }),
            _ => Err(too_short()),
        },
        other => Err(Notification::new(
            code::MESSAGE_HEADER,
            code::BAD_MESSAGE_TYPE,
            &[other],
        )),
    }
}

/// The two length fields of an UPDATE must fit its body (RFC 4271 section 6.3).
fn check_update(body: &[u8]) -> Result<(), Notification> {
    let malformed = || Notification::new(code::UPDATE_MESSAGE, code::MALFORMED_ATTRIBUTE_LIST, &[]);
    let [a, b, ..] = body else {
        return Err(malformed());
    };
    let withdrawn = usize::from(u16::from_be_bytes([*a, *b]));
    let attrs_at = 2 + withdrawn;
    let attrs_len = body
        .get(attrs_at..attrs_at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(malformed)?;
    if attrs_at + 2 + attrs_len > body.len() {
        return Err(malformed());
    }
    Ok(())
}

/// Capability codes vip reads; every other capability is ignored (RFC 5492 section 3).
mod capability {
    pub(super) const MULTIPROTOCOL: u8 = 1;
    pub(super) const ROUTE_REFRESH: u8 = 2;
    pub(super) const GRACEFUL_RESTART: u8 = 64;
    pub(super) const FOUR_OCTET_AS: u8 = 65;
    pub(super) const ENHANCED_ROUTE_REFRESH: u8 = 70;
}

/// Graceful restart flags, in the first octet of the capability (RFC 4724, RFC 8538).
const GR_RESTARTED: u8 = 0x80;
const GR_NOTIFICATION: u8 = 0x40;
/// Per family: the forwarding state was preserved (the pinned datapath forwards on).
const GR_FORWARDING: u8 = 0x80;
/// AS_TRANS (RFC 6793): the 2-octet AS field of a speaker with a 4-octet ASN.
const AS_TRANS: u16 = 23456;

/// Optional parameter type of capabilities (RFC 5492).
const CAPABILITIES_PARAMETER: u8 = 2;
const AFI_IPV4: u16 = 1;
const AFI_IPV6: u16 = 2;
const SAFI_UNICAST: u8 = 1;

/// Decodes an OPEN: the fixed fields, and of the capabilities those vip uses. The optional
/// parameters must tile the message exactly and each capability parameter must hold whole
/// capability TLVs; capabilities vip does not use are skipped whatever they hold (FRR's
/// hostname capability, for one).
fn decode_open(body: &[u8]) -> Result<Open, Notification> {
    let open_err = |sub: u8| Notification::new(code::OPEN_MESSAGE, sub, &[]);
    let fixed: &[u8; 10] = body
        .get(..10)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Notification::new(code::MESSAGE_HEADER, code::BAD_MESSAGE_LENGTH, &[]))?;
    if fixed[0] != 4 {
        // Data: the largest version we support.
        return Err(Notification::new(
            code::OPEN_MESSAGE,
            code::UNSUPPORTED_VERSION,
            &[0, 4],
        ));
    }
    let params_len = usize::from(fixed[9]);
    if 10 + params_len != body.len() {
        return Err(Notification::new(
            code::MESSAGE_HEADER,
            code::BAD_MESSAGE_LENGTH,
            &[],
        ));
    }
    let mut out = Open {
        asn: u32::from(u16::from_be_bytes([fixed[1], fixed[2]])),
        hold_time: u16::from_be_bytes([fixed[3], fixed[4]]),
        router_id: Ipv4Addr::new(fixed[5], fixed[6], fixed[7], fixed[8]),
        four_octet_as: false,
        route_refresh: false,
        ipv4_unicast: false,
        ipv6_unicast: false,
        graceful_notification: false,
    };
    let mut multiprotocol = false;
    let mut params = &body[10..];
    while let [ptype, plen, rest @ ..] = params {
        let Some((mut caps, after)) = rest.split_at_checked(usize::from(*plen)) else {
            return Err(open_err(0));
        };
        if *ptype != CAPABILITIES_PARAMETER {
            return Err(open_err(code::UNSUPPORTED_OPTIONAL_PARAMETER));
        }
        while let [ccode, clen, rest @ ..] = caps {
            let Some((value, after)) = rest.split_at_checked(usize::from(*clen)) else {
                return Err(open_err(0));
            };
            match (*ccode, value) {
                (capability::MULTIPROTOCOL, [a, b, _, safi]) => {
                    multiprotocol = true;
                    match (u16::from_be_bytes([*a, *b]), *safi) {
                        (AFI_IPV4, SAFI_UNICAST) => out.ipv4_unicast = true,
                        (AFI_IPV6, SAFI_UNICAST) => out.ipv6_unicast = true,
                        _ => {}
                    }
                }
                (capability::FOUR_OCTET_AS, [a, b, c, d]) => {
                    out.asn = u32::from_be_bytes([*a, *b, *c, *d]);
                    out.four_octet_as = true;
                }
                (capability::ROUTE_REFRESH | capability::ENHANCED_ROUTE_REFRESH, []) => {
                    out.route_refresh = true;
                }
                // Restart flags and time, then 4 octets per family.
                (capability::GRACEFUL_RESTART, [flags, _, families @ ..])
                    if families.len() % 4 == 0 =>
                {
                    out.graceful_notification = flags & GR_NOTIFICATION != 0;
                }
                (
                    capability::MULTIPROTOCOL
                    | capability::GRACEFUL_RESTART
                    | capability::FOUR_OCTET_AS
                    | capability::ROUTE_REFRESH
                    | capability::ENHANCED_ROUTE_REFRESH,
                    _,
                ) => return Err(open_err(0)),
                _ => {}
            }
            caps = after;
        }
        params = after;
    }
    if !params.is_empty() {
        return Err(open_err(0));
    }
    // Without multiprotocol capabilities a peer speaks IPv4 unicast (RFC 4760 section 8).
    if !multiprotocol {
        out.ipv4_unicast = true;
    }
    if out.hold_time == 1 || out.hold_time == 2 {
        return Err(open_err(code::UNACCEPTABLE_HOLD_TIME));
    }
    if out.router_id.is_unspecified() {
        return Err(open_err(code::BAD_BGP_IDENTIFIER));
    }
    Ok(out)
}

impl Open {
    /// Whether the peer negotiated the address family of a ROUTE-REFRESH (`afi`, `safi`); we
    /// send both unicast families.
    pub fn negotiated(&self, afi: u16, safi: u8) -> bool {
        safi == SAFI_UNICAST
            && ((afi == AFI_IPV4 && self.ipv4_unicast) || (afi == AFI_IPV6 && self.ipv6_unicast))
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + body.len());
    m.extend_from_slice(&[0xff; 16]);
    m.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// Our OPEN.
pub struct OpenParams {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    /// Graceful restart: (restart time in seconds, restarted bit).
    pub graceful_restart: Option<(u16, bool)>,
}

/// Our OPEN: one capabilities parameter with both unicast families, route refresh, the
/// 4-octet ASN and, when on, graceful restart with the N bit (RFC 8538) and both families'
/// forwarding state preserved.
pub fn encode_open(p: &OpenParams) -> Vec<u8> {
    let mut caps = Vec::new();
    for afi in [AFI_IPV4, AFI_IPV6] {
        caps.extend([capability::MULTIPROTOCOL, 4]);
        caps.extend(afi.to_be_bytes());
        caps.extend([0, SAFI_UNICAST]);
    }
    caps.extend([capability::ROUTE_REFRESH, 0]);
    caps.extend([capability::FOUR_OCTET_AS, 4]);
    caps.extend(p.asn.to_be_bytes());
    if let Some((restart_time, restarted)) = p.graceful_restart {
        let flags = GR_NOTIFICATION | if restarted { GR_RESTARTED } else { 0 };
        let time = restart_time.min(4095).to_be_bytes();
        caps.extend([
            capability::GRACEFUL_RESTART,
            2 + 2 * 4,
            flags | time[0],
            time[1],
        ]);
        for afi in [AFI_IPV4, AFI_IPV6] {
            caps.extend(afi.to_be_bytes());
            caps.extend([SAFI_UNICAST, GR_FORWARDING]);
        }
    }
    let two_octet_as = u16::try_from(p.asn).unwrap_or(AS_TRANS);
    let mut body = vec![4];
    body.extend(two_octet_as.to_be_bytes());
    body.extend(p.hold_time.to_be_bytes());
    body.extend(p.router_id.octets());
    body.extend([
        2 + caps.len() as u8,
        CAPABILITIES_PARAMETER,
        caps.len() as u8,
    ]);
    body.extend(caps);
    frame(OPEN, &body)
}

pub fn encode_keepalive() -> Vec<u8> {
    frame(KEEPALIVE, &[])
}

pub fn encode_notification(n: &Notification) -> Vec<u8> {
    let mut body = vec![n.code, n.subcode];
    body.extend_from_slice(&n.data);
    frame(NOTIFICATION, &body)
}

/// Path attributes of announced routes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PathAttrs {
    /// Our ASN, prepended for eBGP; `None` for iBGP (empty AS_PATH).
    pub as_path: Option<u32>,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
}

const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED: u8 = 0x10;

fn attribute(out: &mut Vec<u8>, flags: u8, kind: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | FLAG_EXTENDED, kind]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, kind, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

/// ORIGIN, AS_PATH, MED, LOCAL_PREF, COMMUNITIES, LARGE_COMMUNITY.
fn common_attributes(a: &PathAttrs) -> Vec<u8> {
    let mut out = Vec::new();
    attribute(&mut out, FLAG_TRANSITIVE, 1, &[0]); // ORIGIN IGP
    let as_path: Vec<u8> = match a.as_path {
        // One AS_SEQUENCE (type 2) segment of one 4-octet ASN.
        Some(asn) => [&[2u8, 1][..], &asn.to_be_bytes()].concat(),
        None => Vec::new(),
    };
    attribute(&mut out, FLAG_TRANSITIVE, 2, &as_path);
    if let Some(med) = a.med {
        attribute(&mut out, FLAG_OPTIONAL, 4, &med.to_be_bytes());
    }
    if let Some(pref) = a.local_pref {
        attribute(&mut out, FLAG_TRANSITIVE, 5, &pref.to_be_bytes());
    }
    if !a.communities.is_empty() {
        let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
        attribute(&mut out, FLAG_OPTIONAL | FLAG_TRANSITIVE, 8, &v);
    }
    if !a.large_communities.is_empty() {
        let v: Vec<u8> = a
            .large_communities
            .iter()
            .flat_map(|c| c.iter().flat_map(|x| x.to_be_bytes()))
            .collect();
        attribute(&mut out, FLAG_OPTIONAL | FLAG_TRANSITIVE, 32, &v);
    }
    out
}

fn prefix_v4(a: Ipv4Addr) -> Vec<u8> {
    [&[32u8][..], &a.octets()].concat()
}

fn prefix_v6(a: Ipv6Addr) -> Vec<u8> {
    [&[128u8][..], &a.octets()].concat()
}

fn by_family(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    (v4, v6)
}

/// Room for NLRI in one UPDATE after header, length fields and attributes (kept conservative).
const NLRI_BUDGET: usize = MAX_MESSAGE_LEN - HEADER_LEN - 4 - 512;

/// UPDATEs announcing host routes (/32, /128) for `addrs`, all with attributes `a`. IPv4 goes
/// in the NLRI field with NEXT_HOP; IPv6 in MP_REACH_NLRI. Addresses of a family without a
/// next hop in `a` are not announced.
pub fn encode_announce(addrs: &[IpAddr], a: &PathAttrs) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let common = common_attributes(a);
    let (v4, v6) = by_family(addrs);
    if let Some(nh) = a.next_hop_v4 {
        for chunk in v4.chunks(NLRI_BUDGET / 5) {
            let mut attrs = common.clone();
            attribute(&mut attrs, FLAG_TRANSITIVE, 3, &nh.octets());
            let nlri: Vec<u8> = chunk.iter().flat_map(|p| prefix_v4(*p)).collect();
            out.push(update(&[], &attrs, &nlri));
        }
    }
    if let Some(nh) = a.next_hop_v6 {
        for chunk in v6.chunks(NLRI_BUDGET / 17) {
            let mut attrs = common.clone();
            let mut mp = vec![0, 2, 1, 16]; // AFI IPv6, SAFI unicast, next hop length
            mp.extend_from_slice(&nh.octets());
            mp.push(0); // reserved
            mp.extend(chunk.iter().flat_map(|p| prefix_v6(*p)));
            attribute(&mut attrs, FLAG_OPTIONAL, 14, &mp);
            out.push(update(&[], &attrs, &[]));
        }
    }
    out
}

/// UPDATEs withdrawing host routes for `addrs`.
pub fn encode_withdraw(addrs: &[IpAddr]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let (v4, v6) = by_family(addrs);
    for chunk in v4.chunks(NLRI_BUDGET / 5) {
        let withdrawn: Vec<u8> = chunk.iter().flat_map(|p| prefix_v4(*p)).collect();
        out.push(update(&withdrawn, &[], &[]));
    }
    for chunk in v6.chunks(NLRI_BUDGET / 17) {
        let mut mp = vec![0, 2, 1];
        mp.extend(chunk.iter().flat_map(|p| prefix_v6(*p)));
        let mut attrs = Vec::new();
        attribute(&mut attrs, FLAG_OPTIONAL, 15, &mp);
        out.push(update(&[], &attrs, &[]));
    }
    out
}

/// End-of-RIB markers (RFC 4724): an empty UPDATE for IPv4, an empty MP_UNREACH for IPv6.
pub fn encode_end_of_rib() -> Vec<Vec<u8>> {
    let mut attrs = Vec::new();
    attribute(&mut attrs, FLAG_OPTIONAL, 15, &[0, 2, 1]);
    vec![update(&[], &[], &[]), update(&[], &attrs, &[])]
}

fn update(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + withdrawn.len() + attrs.len() + nlri.len());
    body.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    body.extend_from_slice(withdrawn);
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body.extend_from_slice(nlri);
    frame(UPDATE, &body)
}

/// Parses one whole message (header and body): for tests and fuzzing of the receive path.
pub fn parse_message(bytes: &[u8]) -> Result<Message, Notification> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| Notification::new(code::MESSAGE_HEADER, code::BAD_MESSAGE_LENGTH, &[]))?;
    let (kind, len) = parse_header(header)?;
    let body = bytes
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or_else(|| Notification::new(code::MESSAGE_HEADER, code::BAD_MESSAGE_LENGTH, &[]))?;
    decode_body(kind, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn our_open() -> Vec<u8> {
        encode_open(&OpenParams {
            asn: 4_200_000_001,
            hold_time: 3,
            router_id: Ipv4Addr::new(198, 18, 0, 2),
            graceful_restart: Some((120, false)),
        })
    }

    #[test]
    fn open_round_trips_with_four_octet_asn() {
        let Message::Open(o) = parse_message(&our_open()).unwrap() else {
            panic!("not an OPEN");
        };
        assert_eq!(o.asn, 4_200_000_001);
        assert_eq!(
            (o.hold_time, o.router_id),
            (3, Ipv4Addr::new(198, 18, 0, 2))
        );
        assert!(o.four_octet_as && o.route_refresh && o.ipv4_unicast && o.ipv6_unicast);
        assert!(o.graceful_notification);
    }

    /// The graceful restart capability as RFC 4724 and 8538 lay it out: flags R and N above
    /// the 12-bit restart time, then each family with its forwarding-state bit.
    #[test]
    fn graceful_restart_capability_carries_the_n_bit() {
        let open = encode_open(&OpenParams {
            asn: 65001,
            hold_time: 9,
            router_id: Ipv4Addr::new(198, 18, 0, 2),
            graceful_restart: Some((300, true)),
        });
        let gr = [64, 10, 0xc1, 0x2c, 0, 1, 1, 0x80, 0, 2, 1, 0x80];
        assert!(open.windows(gr.len()).any(|w| w == gr), "{open:02x?}");
        // The 2-octet AS field holds the ASN itself when it fits.
        assert_eq!(
            &open[HEADER_LEN + 1..HEADER_LEN + 3],
            &65001u16.to_be_bytes()
        );
        let without = encode_open(&OpenParams {
            asn: 65001,
            hold_time: 9,
            router_id: Ipv4Addr::new(198, 18, 0, 2),
            graceful_restart: None,
        });
        let Message::Open(o) = parse_message(&without).unwrap() else {
            panic!("not an OPEN");
        };
        assert!(!o.graceful_notification);
    }

    #[test]
    fn as_path_is_a_sequence() {
        let a = PathAttrs {
            as_path: Some(65001),
            next_hop_v4: Some(Ipv4Addr::new(198, 18, 0, 2)),
            ..Default::default()
        };
        let m = &encode_announce(&["198.19.0.1".parse().unwrap()], &a)[0];
        // header, withdrawn len 0, attrs len, ORIGIN (4 bytes), then AS_PATH.
        let as_path = &m[HEADER_LEN + 4 + 4..];
        assert_eq!(&as_path[..9], &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9]);
        assert_eq!(parse_message(m), Ok(Message::Update));
        assert_eq!(&m[m.len() - 5..], &[32, 198, 19, 0, 1]);
    }

    #[test]
    fn header_errors_map_to_the_right_notification() {
        let ka = encode_keepalive();
        let mut bad_marker = ka.clone();
        bad_marker[3] = 0;
        assert_eq!(
            parse_message(&bad_marker).unwrap_err().code,
            code::MESSAGE_HEADER
        );
        assert_eq!(
            parse_message(&bad_marker).unwrap_err().subcode,
            code::CONNECTION_NOT_SYNCHRONIZED
        );
        let mut long_keepalive = ka.clone();
        long_keepalive[17] = 20;
        long_keepalive.push(0);
        assert_eq!(
            parse_message(&long_keepalive).unwrap_err().subcode,
            code::BAD_MESSAGE_LENGTH
        );
        let mut bad_type = ka.clone();
        bad_type[18] = 9;
        assert_eq!(
            parse_message(&bad_type).unwrap_err().subcode,
            code::BAD_MESSAGE_TYPE
        );
        let mut huge = ka;
        huge[16..18].copy_from_slice(&5000u16.to_be_bytes());
        assert_eq!(
            parse_message(&huge).unwrap_err().subcode,
            code::BAD_MESSAGE_LENGTH
        );
    }

    #[test]
    fn open_errors() {
        let mut v3 = our_open();
        v3[HEADER_LEN] = 3;
        assert_eq!(
            parse_message(&v3).unwrap_err().subcode,
            code::UNSUPPORTED_VERSION
        );
        let mut hold2 = our_open();
        hold2[HEADER_LEN + 3..HEADER_LEN + 5].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            parse_message(&hold2).unwrap_err().subcode,
            code::UNACCEPTABLE_HOLD_TIME
        );
        let mut lying_params = our_open();
        lying_params[HEADER_LEN + 9] += 3;
        assert!(parse_message(&lying_params).is_err());
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An OPEN with the hostname capability (73) carrying a domain name, as FRR sends by
    /// default: the capability is skipped and the OPEN accepted (zettabgp's parser refused it).
    #[test]
    fn capabilities_vip_does_not_use_never_fail_an_open() {
        let open = hex("ffffffffffffffffffffffffffffffff00240104fde800090a0000010702054903000161");
        let Ok(Message::Open(o)) = parse_message(&open) else {
            panic!("OPEN refused: {:?}", parse_message(&open));
        };
        assert_eq!((o.asn, o.hold_time), (65000, 9));
        assert_eq!(o.router_id, Ipv4Addr::new(10, 0, 0, 1));
        assert!(o.ipv4_unicast && !o.ipv6_unicast && !o.four_octet_as);
        // A non-UTF-8 host name, an unknown capability with a long value, and the ones vip
        // reads, in one parameter.
        let mut caps = vec![73, 4, 2, 0xff, 0xfe, 0];
        caps.extend_from_slice(&[200, 20]);
        caps.extend_from_slice(&[7; 20]);
        caps.extend_from_slice(&[1, 4, 0, 2, 0, 1, 65, 4, 0, 0, 0xfd, 0xe9, 2, 0]);
        let mut body = vec![4, 0x5b, 0xa0, 0, 3, 198, 18, 1, 1, caps.len() as u8 + 2, 2];
        body.push(caps.len() as u8);
        body.extend_from_slice(&caps);
        let Ok(Message::Open(o)) = decode_body(OPEN, &body) else {
            panic!("OPEN refused");
        };
        assert_eq!(o.asn, 65001);
        assert!(o.four_octet_as && o.route_refresh && o.ipv6_unicast && !o.ipv4_unicast);
        assert!(o.negotiated(2, 1) && !o.negotiated(1, 1) && !o.negotiated(2, 128));
        // A capability vip reads, with the wrong length, is malformed.
        let mut bad = body.clone();
        let at = bad.len() - 2 - 6 - 6;
        assert_eq!(bad[at], 1);
        bad[at + 1] = 3;
        assert!(decode_body(OPEN, &bad).is_err());
    }

    /// Every decoder takes any body, however short, without reading out of bounds.
    #[test]
    fn decoders_check_every_length() {
        for kind in 0..=6 {
            for len in 0..12 {
                let _ = decode_body(kind, &vec![0xff; len]);
                let _ = decode_body(kind, &vec![0; len]);
            }
        }
        assert!(decode_body(NOTIFICATION, &[6]).is_err());
        assert!(decode_body(ROUTE_REFRESH, &[0, 1, 0]).is_err());
        assert!(decode_body(UPDATE, &[0]).is_err());
    }

    /// The receive path never panics and answers every bad input with a NOTIFICATION.
    #[test]
    fn fuzz_receive_path() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let seed = rand::rng().random::<u64>();
        let mut rng = StdRng::seed_from_u64(seed);
        let a = PathAttrs {
            as_path: Some(65001),
            next_hop_v4: Some(Ipv4Addr::new(198, 18, 0, 2)),
            next_hop_v6: Some("fd00::2".parse().unwrap()),
            communities: vec![0xfde9_0064],
            large_communities: vec![[65001, 1, 2]],
            med: Some(5),
            local_pref: None,
        };
        let mut valid = vec![
            our_open(),
            encode_keepalive(),
            encode_notification(&Notification::new(6, 2, b"bye")),
        ];
        valid.extend(encode_announce(
            &["198.19.0.1".parse().unwrap(), "fd00:19::1".parse().unwrap()],
            &a,
        ));
        valid.extend(encode_withdraw(&[
            "198.19.0.1".parse().unwrap(),
            "fd00:19::1".parse().unwrap(),
        ]));
        valid.extend(encode_end_of_rib());
        let mut rr = vec![0xff; 16];
        rr.extend_from_slice(&[0, 23, ROUTE_REFRESH, 0, 1, 0, 1]);
        valid.push(rr);
        for m in &valid {
            assert!(parse_message(m).is_ok(), "valid message rejected: {m:02x?}");
        }
        let mut rejected = 0;
        for i in 0..100_000 {
            let input: Vec<u8> = match i % 3 {
                0 => {
                    let len = rng.random_range(0..200);
                    let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    if rng.random_bool(0.7) && v.len() >= 19 {
                        v[..16].fill(0xff);
                        let len = v.len() as u16;
                        v[16..18].copy_from_slice(&len.to_be_bytes());
                        v[18] = rng.random_range(1..=5);
                    }
                    v
                }
                1 => {
                    let m = &valid[rng.random_range(0..valid.len())];
                    m[..rng.random_range(0..=m.len())].to_vec()
                }
                _ => {
                    let mut m = valid[rng.random_range(0..valid.len())].clone();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..m.len());
                        m[at] = rng.random();
                    }
                    m
                }
            };
            if let Err(n) = parse_message(&input) {
                assert!(
                    (1..=6).contains(&n.code),
                    "seed {seed}: {n:?} for {input:02x?}"
                );
                rejected += 1;
            }
        }
        assert!(rejected > 30_000, "seed {seed}: only {rejected} rejected");
    }
}
