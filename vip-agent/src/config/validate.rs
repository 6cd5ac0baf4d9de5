//! From the file as written to the typed config: every check that spans fields.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use toml::Spanned;
use vip_common::{layout::CAPACITY_LIMIT, maglev::is_prime};

use super::{auto::HostAddresses, error::ConfigError, raw::*, types::*};

/// `ASN:VALUE` (RFC 1997), both 16-bit; or a well-known name.
fn parse_community(s: &str) -> Result<u32, String> {
    match s {
        "graceful-shutdown" => return Ok(0xffff_0000),
        "no-export" => return Ok(0xffff_ff01),
        "no-advertise" => return Ok(0xffff_ff02),
        _ => {}
    }
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not ASN:VALUE"))?;
    let a: u16 = a
        .parse()
        .map_err(|_| format!("{s:?}: {a} is not 0..65535"))?;
    let b: u16 = b
        .parse()
        .map_err(|_| format!("{s:?}: {b} is not 0..65535"))?;
    Ok((u32::from(a) << 16) | u32::from(b))
}

/// `GLOBAL:LOCAL1:LOCAL2` (RFC 8092), three 32-bit numbers.
fn parse_large_community(s: &str) -> Result<[u32; 3], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 {
        return Err(format!("{s:?} is not GLOBAL:LOCAL1:LOCAL2"));
    }
    let mut out = [0u32; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse()
            .map_err(|_| format!("{s:?}: {p} is not a 32-bit number"))?;
    }
    Ok(out)
}

pub(super) type Located<'a> = dyn Fn(&Range<usize>, String, String) -> ConfigError + 'a;

/// Why an address cannot stand for a host here (a VIP, a backend, a source), if it cannot.
pub(super) fn not_unicast(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("the unspecified address")
    } else if addr.is_multicast() {
        Some("a multicast address")
    } else if addr.is_loopback() {
        Some("a loopback address")
    } else if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Longest UDP idle timeout: a day (the datapath keeps it in nanoseconds).
const MAX_UDP_IDLE_SECS: u64 = 86_400;
/// Longest drain time: an hour.
const MAX_DRAIN_SECS: u64 = 3_600;
/// Conntrack entries per map.
const CONNTRACK_RANGE: std::ops::RangeInclusive<u32> = 1_024..=(1 << 27);
/// What the Maglev tables may take in kernel memory (8 bytes a slot).
const MAX_MAGLEV_BYTES: u64 = 4 << 30;
/// Linux interface names: IFNAMSIZ - 1.
const MAX_IFNAME: usize = 15;

fn communities_of(
    communities: &[Spanned<String>],
    large: &[Spanned<String>],
    err: &dyn Fn(&Range<usize>, &str, String) -> ConfigError,
) -> Result<(Vec<u32>, Vec<[u32; 3]>), ConfigError> {
    let standard = communities
        .iter()
        .map(|c| parse_community(c.get_ref()).map_err(|m| err(&c.span(), "communities", m)))
        .collect::<Result<_, _>>()?;
    let large = large
        .iter()
        .map(|c| {
            parse_large_community(c.get_ref()).map_err(|m| err(&c.span(), "large_communities", m))
        })
        .collect::<Result<_, _>>()?;
    Ok((standard, large))
}

/// The addresses `"auto"` may stand for, resolved once for the whole config.
struct Sources<'a> {
    host: &'a HostAddresses,
    /// The node's first interface, where `"auto"` looks.
    uplink: &'a str,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

fn validate_bgp(mut b: RawBgp, err: &Located, sources: &Sources) -> Result<BgpConfig, ConfigError> {
    let nowhere = 0..0;
    let router_id = b
        .router_id
        .clone()
        .resolve(|| {
            sources
                .v4
                .map_or_else(|| sources.host.ipv4(sources.uplink), Ok)
        })
        .map_err(|m| err(&nowhere, "bgp.router_id".into(), m))?;
    let next_hop_v6 = b
        .next_hop_v6
        .take()
        .map(|n| n.resolve(|| sources.host.ipv6(sources.uplink)))
        .transpose()
        .map_err(|m| err(&nowhere, "bgp.next_hop_v6".into(), m))?;
    let hold = *b.hold_time.get_ref();
    if hold == 1 || hold == 2 {
        return Err(err(
            &b.hold_time.span(),
            "bgp.hold_time".into(),
            format!("{hold}: use 0 (no keepalives) or 3 and more seconds"),
        ));
    }
    let gr = *b.graceful_restart_time.get_ref();
    if gr > 4095 {
        return Err(err(
            &b.graceful_restart_time.span(),
            "bgp.graceful_restart_time".into(),
            format!("{gr}: at most 4095 seconds (0 = off)"),
        ));
    }
    if b.asn == 0 {
        return Err(err(
            &(0..0),
            "bgp.asn".into(),
            "0 is not a valid ASN".into(),
        ));
    }
    if router_id.is_unspecified() {
        return Err(err(
            &(0..0),
            "bgp.router_id".into(),
            "0.0.0.0 is not a valid router ID".into(),
        ));
    }
    let (communities, large_communities) =
        communities_of(&b.communities, &b.large_communities, &|span, which, m| {
            err(span, format!("bgp.{which}"), m)
        })?;
    let bfd_timers = bfd_timers(&b, err)?;
    let mut peers = Vec::new();
    let mut seen = HashSet::new();
    let mut errors = Vec::new();
    for (i, p) in b.peers.into_iter().enumerate() {
        let one = || -> Result<BgpPeerConfig, ConfigError> {
            let p = p.into_inner();
            let field = |f: &str| format!("bgp.peer[{i}].{f}");
            let address = *p.address.get_ref();
            if p.asn == 0 {
                return Err(err(
                    &p.address.span(),
                    field("asn"),
                    "0 is no AS number: use the peer's".into(),
                ));
            }
            if let Some(why) = not_unicast(address) {
                return Err(err(
                    &p.address.span(),
                    field("address"),
                    format!("{address} is {why}: use the peer's unicast address"),
                ));
            }
            if !seen.insert(address) {
                return Err(err(
                    &p.address.span(),
                    field("address"),
                    format!("peer {address} is configured twice"),
                ));
            }
            if let Some(h) = &p.hold_time
                && (*h.get_ref() == 1 || *h.get_ref() == 2)
            {
                return Err(err(
                    &h.span(),
                    field("hold_time"),
                    "use 0 or 3 and more seconds".into(),
                ));
            }
            let password = match (p.password, &p.password_file) {
                (Some(pw), Some(_)) => {
                    return Err(err(
                        &pw.span(),
                        field("password"),
                        "give `password` or `password_file`, not both".into(),
                    ));
                }
                (Some(pw), None) => Some(pw),
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file.get_ref()).map_err(|e| {
                        err(
                            &file.span(),
                            field("password_file"),
                            format!("cannot read {}: {e}", file.get_ref().display()),
                        )
                    })?;
                    let key = text.strip_suffix('\n').unwrap_or(&text);
                    let key = key.strip_suffix('\r').unwrap_or(key);
                    Some(Spanned::new(file.span(), key.to_owned()))
                }
                (None, None) => None,
            };
            if let Some(pw) = &password
                && (pw.get_ref().is_empty() || pw.get_ref().len() > 80)
            {
                return Err(err(
                    &pw.span(),
                    field("password"),
                    "TCP MD5 keys are 1 to 80 bytes (leave `password` out for none)".into(),
                ));
            }
            let (pc, plc) =
                communities_of(&p.communities, &p.large_communities, &|span, which, m| {
                    err(span, field(which), m)
                })?;
            Ok(BgpPeerConfig {
                address,
                asn: p.asn,
                port: p.port,
                passive: p.passive,
                router_id: p.router_id,
                password: password.map(|s| s.into_inner()),
                hold_time: p.hold_time.map(|h| h.into_inner()),
                bfd: p.bfd.unwrap_or(b.bfd),
                med: p.med,
                local_pref: p.local_pref,
                communities: pc,
                large_communities: plc,
            })
        };
        match one() {
            Ok(peer) => peers.push(peer),
            Err(e) => errors.push(e),
        }
    }
    if let Some(all) = ConfigError::all(errors) {
        return Err(all);
    }
    Ok(BgpConfig {
        asn: b.asn,
        router_id,
        hold_time: hold,
        graceful_restart_time: (gr > 0).then_some(gr),
        next_hop_v4: b.next_hop_v4,
        next_hop_v6,
        communities,
        large_communities,
        drain_time: drain_time(b.drain_time, "bgp.drain_time", err)?,
        listen: b.listen || peers.iter().any(|p| p.passive),
        bfd_timers,
        peers,
    })
}

fn bfd_timers(b: &RawBgp, err: &Located) -> Result<crate::bfd::Timers, ConfigError> {
    let interval = |v: &Spanned<u64>, field: &str| {
        let ms = *v.get_ref();
        if BFD_INTERVAL_RANGE_MS.contains(&ms) {
            Ok(Duration::from_millis(ms))
        } else {
            Err(err(
                &v.span(),
                format!("bgp.{field}"),
                format!(
                    "{ms}: use {} to {} milliseconds",
                    BFD_INTERVAL_RANGE_MS.start(),
                    BFD_INTERVAL_RANGE_MS.end()
                ),
            ))
        }
    };
    let multiplier = *b.bfd_multiplier.get_ref();
    if multiplier == 0 {
        return Err(err(
            &b.bfd_multiplier.span(),
            "bgp.bfd_multiplier".into(),
            "0: use 1 to 255 (3 is usual)".into(),
        ));
    }
    Ok(crate::bfd::Timers {
        min_tx: interval(&b.bfd_min_tx, "bfd_min_tx")?,
        min_rx: interval(&b.bfd_min_rx, "bfd_min_rx")?,
        multiplier,
    })
}

/// A drain time, in range.
fn drain_time(seconds: u64, field: &str, err: &Located) -> Result<Duration, ConfigError> {
    if seconds > MAX_DRAIN_SECS {
        return Err(err(
            &(0..0),
            field.into(),
            format!("{seconds}: use 0 to {MAX_DRAIN_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs(seconds))
}

/// VIPs of a family the BGP sessions cannot carry: an IPv6 VIP needs an IPv6 session or
/// `next_hop_v6`, an IPv4 VIP an IPv4 session or `next_hop_v4` (else it is never announced).
fn check_next_hops(bgp: &BgpConfig, vips: &[VipConfig], err: &Located) -> Result<(), ConfigError> {
    for vip in vips {
        let (has_session, has_next_hop, which) = match vip.address {
            IpAddr::V4(_) => (
                bgp.peers.iter().any(|p| p.address.is_ipv4()),
                bgp.next_hop_v4.is_some(),
                "next_hop_v4",
            ),
            IpAddr::V6(_) => (
                bgp.peers.iter().any(|p| p.address.is_ipv6()),
                bgp.next_hop_v6.is_some(),
                "next_hop_v6",
            ),
        };
        if !has_session && !has_next_hop {
            return Err(err(
                &(0..0),
                format!("bgp.{which}"),
                format!(
                    "VIP {} cannot be announced: no peer of its family; set bgp.{which}",
                    vip.address
                ),
            ));
        }
    }
    Ok(())
}

/// The node's own settings: names, paths, addresses and sizes in their ranges.
fn check_node(node: &RawNode, sources: &Sources, err: &Located) -> Result<(), ConfigError> {
    let nowhere = 0..0;
    let mut names = HashSet::new();
    for name in node.interfaces.get_ref() {
        let problem = if name.is_empty() || name.len() > MAX_IFNAME {
            Some(format!(
                "{name:?}: interface names are 1 to {MAX_IFNAME} bytes"
            ))
        } else if name.contains(['/', ' ']) {
            Some(format!("{name:?} is not an interface name"))
        } else if !names.insert(name) {
            Some(format!("{name} is listed twice"))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(err(
                &node.interfaces.span(),
                "node.interfaces".into(),
                problem,
            ));
        }
    }
    for (dir, field) in [
        (&node.pin_dir, "node.pin_dir"),
        (&node.control_socket, "node.control_socket"),
    ] {
        if !dir.is_absolute() || dir.parent().is_none() {
            return Err(err(
                &nowhere,
                field.into(),
                format!("{}: use an absolute path below /", dir.display()),
            ));
        }
    }
    let addresses = [
        sources.v4.map(IpAddr::V4).map(|a| (a, "node.source_v4")),
        sources.v6.map(IpAddr::V6).map(|a| (a, "node.source_v6")),
    ];
    for (addr, field) in addresses.into_iter().flatten() {
        if let Some(why) = not_unicast(addr) {
            return Err(err(
                &nowhere,
                field.into(),
                format!("{addr} is {why}: use this node's own unicast address"),
            ));
        }
    }
    if !CONNTRACK_RANGE.contains(&node.conntrack_entries) {
        return Err(err(
            &nowhere,
            "node.conntrack_entries".into(),
            format!(
                "{}: use {} to {}",
                node.conntrack_entries,
                CONNTRACK_RANGE.start(),
                CONNTRACK_RANGE.end()
            ),
        ));
    }
    let slots = *node.table_slots.get_ref();
    let bytes = u64::from(*node.table_size.get_ref()) * u64::from(slots) * 8;
    if slots < 2 || bytes > MAX_MAGLEV_BYTES {
        return Err(err(
            &node.table_slots.span(),
            "node.table_slots".into(),
            format!(
                "{slots} slots of {} entries take {} MiB of kernel memory: use at least 2 slots \
                 and at most {} MiB in all (a smaller table_size, or fewer slots)",
                node.table_size.get_ref(),
                bytes >> 20,
                MAX_MAGLEV_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

pub(super) fn validate(
    path: &Path,
    text: &str,
    raw: RawConfig,
    host: &HostAddresses,
) -> Result<Config, ConfigError> {
    let err = |span: &Range<usize>, field: String, message: String| {
        ConfigError::at(path, text, span, field, message)
    };
    let mut node = raw.node;
    let role = *node.role.get_ref();
    let uplink = node
        .interfaces
        .get_ref()
        .first()
        .cloned()
        .unwrap_or_default();
    let v4 = node
        .source_v4
        .take()
        .map(|a| a.resolve(|| host.ipv4(&uplink)));
    let v6 = node
        .source_v6
        .take()
        .map(|a| a.resolve(|| host.ipv6(&uplink)));
    let sources = Sources {
        host,
        uplink: &uplink,
        v4: v4
            .transpose()
            .map_err(|m| err(&(0..0), "node.source_v4".into(), m))?,
        v6: v6
            .transpose()
            .map_err(|m| err(&(0..0), "node.source_v6".into(), m))?,
    };
    // Every mistake is collected, so that one run of check-config shows them all; what the
    // node's addresses resolve to is needed by everything after it, so that alone stops here.
    let mut errors = Vec::new();
    if let Err(e) = check_node(&node, &sources, &err) {
        errors.push(e);
    }
    let backend = match (role, raw.backend) {
        (Role::Backend, None) => {
            errors.push(err(
                &node.role.span(),
                "backend".into(),
                "role \"backend\" needs a [backend] section with `addresses` (and `vips`)".into(),
            ));
            None
        }
        (Role::Lb, Some(b)) => {
            errors.push(err(
                &b.span(),
                "backend".into(),
                "a [backend] section needs node.role = \"backend\"".into(),
            ));
            None
        }
        (Role::Backend, Some(b)) => {
            let b = b.into_inner();
            let span = b.addresses.span();
            let addresses = b
                .addresses
                .into_inner()
                .resolve(|| host.all(node.interfaces.get_ref()));
            match &addresses {
                Err(m) => errors.push(err(&span, "backend.addresses".into(), m.clone())),
                Ok(a) if a.is_empty() => errors.push(err(
                    &span,
                    "backend.addresses".into(),
                    "list this backend's own addresses (the outer destinations it accepts)".into(),
                )),
                Ok(_) => {}
            }
            if let Some(v) = raw.vips.first() {
                errors.push(err(
                    &v.span(),
                    "vip".into(),
                    "a backend lists the VIPs it serves in backend.vips, not as [[vip]]".into(),
                ));
            }
            addresses.ok().map(|addresses| BackendRole {
                addresses,
                vips: b.vips,
                gue_port: b.gue_port.filter(|p| *p != 0),
            })
        }
        (Role::Lb, None) => None,
    };
    if node.interfaces.get_ref().is_empty() {
        errors.push(err(
            &node.interfaces.span(),
            "node.interfaces".into(),
            "list at least one interface to attach to, e.g. [\"eth0\"]".into(),
        ));
    }
    let table_size = *node.table_size.get_ref();
    if !is_prime(table_size) || table_size < 7 {
        errors.push(err(
            &node.table_size.span(),
            "node.table_size".into(),
            format!("{table_size} is not a prime number of at least 7 (e.g. 65537, 16381, 251)"),
        ));
    }
    let table_slots = *node.table_slots.get_ref();
    // Each egress address of a load balancer keeps its owner table in a slot too.
    let tables = raw.vips.len()
        + if role == Role::Lb {
            raw.egress.len()
        } else {
            0
        };
    if tables as u64 >= u64::from(table_slots) {
        errors.push(err(
            &node.table_slots.span(),
            "node.table_slots".into(),
            format!(
                "{table_slots} Maglev table slots cannot hold {tables} tables (one per VIP and \
                 per egress address) plus a spare for switching tables: set at least {}",
                tables + 1
            ),
        ));
    }
    for (capacity, name) in [
        (&node.max_vips, "max_vips"),
        (&node.max_backends, "max_backends"),
    ] {
        if !(1..=CAPACITY_LIMIT).contains(capacity.get_ref()) {
            errors.push(err(
                &capacity.span(),
                format!("node.{name}"),
                format!("{}: use 1 to {CAPACITY_LIMIT}", capacity.get_ref()),
            ));
        }
    }
    let max_vips = *node.max_vips.get_ref();
    if raw.vips.len() > max_vips as usize {
        errors.push(err(
            &node.max_vips.span(),
            "node.max_vips".into(),
            format!(
                "{} VIPs, but max_vips is {max_vips}: raise it",
                raw.vips.len()
            ),
        ));
    }
    let max_backends = *node.max_backends.get_ref();
    let backend_entries: usize = raw.vips.iter().map(|v| v.get_ref().backends.len()).sum();
    if backend_entries > max_backends as usize {
        errors.push(err(
            &node.max_backends.span(),
            "node.max_backends".into(),
            format!(
                "{backend_entries} backends over all VIPs (each backend of each VIP counts), but \
                 max_backends is {max_backends}: raise it"
            ),
        ));
    }

    let vip_addresses: HashSet<IpAddr> = raw
        .vips
        .iter()
        .map(|v| *v.get_ref().address.get_ref())
        .collect();
    let mut vips = Vec::new();
    let mut keys = HashSet::new();
    for (i, spanned) in raw.vips.into_iter().enumerate() {
        // Every VIP is checked, so that one run shows every VIP's mistake.
        let one = || -> Result<VipConfig, ConfigError> {
            let vip_span = spanned.span();
            let v = spanned.into_inner();
            let address = *v.address.get_ref();
            let field = |f: &str| format!("vip[{i}].{f}");
            let key = (address, v.protocol, v.port);
            if !keys.insert(key) {
                return Err(err(
                    &v.address.span(),
                    field("address"),
                    format!(
                        "{address} {:?} port {} is configured twice",
                        v.protocol, v.port
                    ),
                ));
            }
            if let Some(why) = not_unicast(address) {
                return Err(err(
                    &v.address.span(),
                    field("address"),
                    format!("{address} is {why}: a VIP must be a unicast address"),
                ));
            }
            if v.encapsulation == Encapsulation::Gue && v.gue_port == 0 {
                return Err(err(
                    &vip_span,
                    field("gue_port"),
                    "0 is no port: use the backends' GUE port (e.g. 6080)".into(),
                ));
            }
            let mut backends = Vec::new();
            let mut seen = HashSet::new();
            for (j, b) in v.backends.iter().enumerate() {
                let b = b.get_ref();
                let baddr = *b.address.get_ref();
                let bfield = |f: &str| format!("vip[{i}].backend[{j}].{f}");
                if !seen.insert(baddr) {
                    return Err(err(
                        &b.address.span(),
                        bfield("address"),
                        format!("backend {baddr} is listed twice for this VIP"),
                    ));
                }
                if let Some(why) = not_unicast(baddr) {
                    return Err(err(
                        &b.address.span(),
                        bfield("address"),
                        format!("{baddr} is {why}: a backend must be a unicast address"),
                    ));
                }
                if vip_addresses.contains(&baddr) {
                    return Err(err(
                        &b.address.span(),
                        bfield("address"),
                        format!("{baddr} is a VIP: a backend is a host behind the VIPs"),
                    ));
                }
                let weight = *b.weight.get_ref();
                if weight > MAX_WEIGHT {
                    return Err(err(
                        &b.weight.span(),
                        bfield("weight"),
                        format!("{weight} is above the maximum weight {MAX_WEIGHT} (0 = drain)"),
                    ));
                }
                let source_missing = match baddr {
                    IpAddr::V4(_) => sources.v4.is_none(),
                    IpAddr::V6(_) => sources.v6.is_none(),
                };
                if source_missing && v.source_prefix.is_none() {
                    let which = if baddr.is_ipv4() {
                        "source_v4"
                    } else {
                        "source_v6"
                    };
                    return Err(err(
                        &b.address.span(),
                        bfield("address"),
                        format!(
                            "backend {baddr} needs an outer source address: set node.{which} \
                             (or a vip source_prefix of that family)"
                        ),
                    ));
                }
                let health = v
                    .health
                    .merged(b.health.as_ref().unwrap_or(&RawHealth::default()))
                    .resolve(v.port)
                    .map_err(|m| {
                        let f = if b.health.is_some() {
                            bfield("health")
                        } else {
                            field("health")
                        };
                        err(&b.address.span(), f, m)
                    })?;
                if health.via == CheckVia::Datapath && health.kind != CheckKind::None {
                    let problem = if baddr.is_ipv4() != address.is_ipv4() {
                        Some("the backend's address family must match the VIP's".to_string())
                    } else if baddr.is_ipv6() && v.encapsulation == Encapsulation::Gue {
                        Some("GUE VIPs are checked through the data path over IPv4 only".into())
                    } else if source_missing {
                        let which = if baddr.is_ipv4() {
                            "source_v4"
                        } else {
                            "source_v6"
                        };
                        Some(format!("the probes come from node.{which}: set it"))
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        let f = if b.health.is_some() {
                            bfield("health.via")
                        } else {
                            field("health.via")
                        };
                        return Err(err(
                            &b.address.span(),
                            f,
                            format!("via = \"datapath\" with backend {baddr}: {problem}"),
                        ));
                    }
                }
                backends.push(BackendConfig {
                    address: baddr,
                    weight,
                    state: b.state,
                    health,
                });
            }
            if let Some(prefix) = &v.source_prefix {
                let p = *prefix.get_ref();
                let wrong_family = v
                    .backends
                    .iter()
                    .any(|b| b.get_ref().address.get_ref().is_ipv4() != p.addr().is_ipv4());
                if wrong_family {
                    return Err(err(
                        &prefix.span(),
                        field("source_prefix"),
                        format!("{p}: the prefix's family must match the VIP's backends"),
                    ));
                }
                if let IpNet::V6(p6) = p
                    && p6.prefix_len() < 96
                {
                    return Err(err(
                        &prefix.span(),
                        field("source_prefix"),
                        format!(
                            "{p}: IPv6 source prefixes must be /96 or longer (entropy goes in the last 32 bits)"
                        ),
                    ));
                }
            }
            if !(1..=MAX_UDP_IDLE_SECS).contains(&v.udp_idle_timeout) {
                return Err(err(
                    &vip_span,
                    field("udp_idle_timeout"),
                    format!(
                        "{}: use 1 to {MAX_UDP_IDLE_SECS} seconds",
                        v.udp_idle_timeout
                    ),
                ));
            }
            let (communities, large_communities) = communities_of(
                &v.communities,
                &v.large_communities,
                &|span, which, message| err(span, field(which), message),
            )?;
            Ok(VipConfig {
                communities,
                large_communities,
                med: v.med,
                address,
                protocol: v.protocol,
                port: v.port,
                encapsulation: v.encapsulation,
                gue_port: v.gue_port,
                source_prefix: v.source_prefix.map(|p| p.into_inner().trunc()),
                hash: v.hash,
                udp_idle_timeout: Duration::from_secs(v.udp_idle_timeout),
                backends,
            })
        };
        match one() {
            Ok(vip) => vips.push(vip),
            Err(e) => errors.push(e),
        }
    }
    let bgp = match raw.bgp {
        None => None,
        Some(b) if role == Role::Backend => {
            return Err(err(
                &b.span(),
                "bgp".into(),
                "backends do not announce VIPs: remove [bgp]".into(),
            ));
        }
        Some(b) => match validate_bgp(b.into_inner(), &err, &sources) {
            Ok(b) => Some(b),
            Err(e) => {
                errors.push(e);
                None
            }
        },
    };
    // What follows needs the VIPs and BGP settings whole.
    if let Some(all) = ConfigError::all(errors) {
        return Err(all);
    }
    if let Some(b) = &bgp {
        check_next_hops(b, &vips, &err)?;
    }
    let sync = raw
        .sync
        .map(|s| super::sync::validate(s, role, &err))
        .transpose()?;
    let egress = super::egress::validate(
        raw.egress,
        &super::egress::EgressContext {
            vips: &vips,
            backend: backend.as_ref(),
            table_size,
        },
        &err,
    )?;
    let kernel_routes = match raw.announce {
        None => None,
        Some(a) => {
            let span = a.span();
            let a = a.into_inner();
            match a.mode {
                AnnounceMode::Bgp if bgp.is_none() => {
                    return Err(err(
                        &span,
                        "announce.mode".into(),
                        "\"bgp\" needs a [bgp] section".into(),
                    ));
                }
                AnnounceMode::Bgp => None,
                AnnounceMode::Kernel if bgp.is_some() || role == Role::Backend => {
                    return Err(err(
                        &span,
                        "announce.mode".into(),
                        "\"kernel\" is for load-balancer nodes without [bgp]: remove one".into(),
                    ));
                }
                AnnounceMode::Kernel => {
                    let table = *a.table.get_ref();
                    // 0 is no table; 253, 254, 255 are default, main and local.
                    if table == 0 || (253..=255).contains(&table) {
                        return Err(err(
                            &a.table.span(),
                            "announce.table".into(),
                            format!(
                                "{table}: use a table of its own, not 0, 253 (default), 254 (main) or 255 (local)"
                            ),
                        ));
                    }
                    let protocol = *a.protocol.get_ref();
                    // 0-4 are the kernel's own (unspec, redirect, kernel, boot, static).
                    if protocol <= 4 {
                        return Err(err(
                            &a.protocol.span(),
                            "announce.protocol".into(),
                            format!(
                                "{protocol}: 0 to 4 are the kernel's; use one no other daemon uses (default {DEFAULT_ROUTE_PROTOCOL})"
                            ),
                        ));
                    }
                    Some(KernelRoutesConfig {
                        table,
                        protocol,
                        drain_time: drain_time(a.drain_time, "announce.drain_time", &err)?,
                    })
                }
            }
        }
    };
    Ok(Config {
        bgp,
        kernel_routes,
        backend,
        egress,
        sync,
        node: NodeConfig {
            role,
            interfaces: node.interfaces.into_inner(),
            attach: node.attach,
            source_v4: sources.v4,
            source_v6: sources.v6,
            pin_dir: node.pin_dir,
            metrics_address: node.metrics_address,
            control_socket: node.control_socket,
            table_size,
            table_slots,
            conntrack_entries: node.conntrack_entries,
            conntrack_insert_limit: node.conntrack_insert_limit,
            max_vips,
            max_backends,
        },
        vips,
    })
}
