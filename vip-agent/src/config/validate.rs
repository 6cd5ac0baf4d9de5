//! From the file as written to the typed config: every check that spans fields.

use std::{collections::HashSet, net::IpAddr, ops::Range, path::Path, time::Duration};

use ipnet::IpNet;
use toml::Spanned;
use vip_common::{layout::CAPACITY_LIMIT, maglev::is_prime};

use super::{
    error::{ConfigError, line_of},
    raw::*,
    types::*,
};

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

type Located<'a> = dyn Fn(&Range<usize>, String, String) -> ConfigError + 'a;

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

fn validate_bgp(b: RawBgp, err: &Located) -> Result<BgpConfig, ConfigError> {
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
    if b.router_id.is_unspecified() {
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
    let mut peers = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in b.peers.into_iter().enumerate() {
        let p = p.into_inner();
        let field = |f: &str| format!("bgp.peer[{i}].{f}");
        let address = *p.address.get_ref();
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
        if let Some(pw) = &p.password
            && (pw.get_ref().is_empty() || pw.get_ref().len() > 80)
        {
            return Err(err(
                &pw.span(),
                field("password"),
                "TCP MD5 keys are 1 to 80 bytes (leave `password` out for none)".into(),
            ));
        }
        let (pc, plc) = communities_of(&p.communities, &p.large_communities, &|span, which, m| {
            err(span, field(which), m)
        })?;
        peers.push(BgpPeerConfig {
            address,
            asn: p.asn,
            port: p.port,
            passive: p.passive,
            router_id: p.router_id,
            password: p.password.map(|s| s.into_inner()),
            hold_time: p.hold_time.map(|h| h.into_inner()),
            med: p.med,
            local_pref: p.local_pref,
            communities: pc,
            large_communities: plc,
        });
    }
    Ok(BgpConfig {
        asn: b.asn,
        router_id: b.router_id,
        hold_time: hold,
        graceful_restart_time: (gr > 0).then_some(gr),
        next_hop_v4: b.next_hop_v4,
        next_hop_v6: b.next_hop_v6,
        communities,
        large_communities,
        drain_time: Duration::from_secs(b.drain_time),
        listen: b.listen || peers.iter().any(|p| p.passive),
        peers,
    })
}

pub(super) fn validate(path: &Path, text: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |span: &Range<usize>, field: String, message: String| ConfigError {
        file: path.to_owned(),
        line: (span.end > 0).then(|| line_of(text, span)),
        field,
        message,
    };
    let node = raw.node;
    let role = *node.role.get_ref();
    let backend = match (role, raw.backend) {
        (Role::Backend, None) => {
            return Err(err(
                &node.role.span(),
                "backend".into(),
                "role \"backend\" needs a [backend] section with `addresses` (and `vips`)".into(),
            ));
        }
        (Role::Lb, Some(b)) => {
            return Err(err(
                &b.span(),
                "backend".into(),
                "a [backend] section needs node.role = \"backend\"".into(),
            ));
        }
        (Role::Backend, Some(b)) => {
            let b = b.into_inner();
            if b.addresses.get_ref().is_empty() {
                return Err(err(
                    &b.addresses.span(),
                    "backend.addresses".into(),
                    "list this backend's own addresses (the outer destinations it accepts)".into(),
                ));
            }
            if let Some(v) = raw.vips.first() {
                return Err(err(
                    &v.span(),
                    "vip".into(),
                    "a backend lists the VIPs it serves in backend.vips, not as [[vip]]".into(),
                ));
            }
            Some(BackendRole {
                addresses: b.addresses.into_inner(),
                vips: b.vips,
                gue_port: b.gue_port.filter(|p| *p != 0),
            })
        }
        (Role::Lb, None) => None,
    };
    if node.interfaces.get_ref().is_empty() {
        return Err(err(
            &node.interfaces.span(),
            "node.interfaces".into(),
            "list at least one interface to attach to, e.g. [\"eth0\"]".into(),
        ));
    }
    let table_size = *node.table_size.get_ref();
    if !is_prime(table_size) || table_size < 7 {
        return Err(err(
            &node.table_size.span(),
            "node.table_size".into(),
            format!("{table_size} is not a prime number of at least 7 (e.g. 65537, 16381, 251)"),
        ));
    }
    let table_slots = *node.table_slots.get_ref();
    if raw.vips.len() as u64 >= u64::from(table_slots) {
        return Err(err(
            &node.table_slots.span(),
            "node.table_slots".into(),
            format!(
                "{table_slots} Maglev table slots cannot hold {} VIPs plus a spare for switching \
                 tables: set at least {}",
                raw.vips.len(),
                raw.vips.len() + 1
            ),
        ));
    }
    for (capacity, name) in [
        (&node.max_vips, "max_vips"),
        (&node.max_backends, "max_backends"),
    ] {
        if !(1..=CAPACITY_LIMIT).contains(capacity.get_ref()) {
            return Err(err(
                &capacity.span(),
                format!("node.{name}"),
                format!("{}: use 1 to {CAPACITY_LIMIT}", capacity.get_ref()),
            ));
        }
    }
    let max_vips = *node.max_vips.get_ref();
    if raw.vips.len() > max_vips as usize {
        return Err(err(
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
        return Err(err(
            &node.max_backends.span(),
            "node.max_backends".into(),
            format!(
                "{backend_entries} backends over all VIPs (each backend of each VIP counts), but \
                 max_backends is {max_backends}: raise it"
            ),
        ));
    }

    let mut vips = Vec::new();
    let mut keys = HashSet::new();
    for (i, spanned) in raw.vips.into_iter().enumerate() {
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
        if address.is_unspecified() || address.is_multicast() {
            return Err(err(
                &v.address.span(),
                field("address"),
                format!("{address} cannot be a VIP: use a unicast address"),
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
            let weight = *b.weight.get_ref();
            if weight > MAX_WEIGHT {
                return Err(err(
                    &b.weight.span(),
                    bfield("weight"),
                    format!("{weight} is above the maximum weight {MAX_WEIGHT} (0 = drain)"),
                ));
            }
            let source_missing = match baddr {
                IpAddr::V4(_) => node.source_v4.is_none(),
                IpAddr::V6(_) => node.source_v6.is_none(),
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
        if v.udp_idle_timeout == 0 {
            return Err(err(
                &vip_span,
                field("udp_idle_timeout"),
                "must be at least 1 (seconds)".into(),
            ));
        }
        let (communities, large_communities) = communities_of(
            &v.communities,
            &v.large_communities,
            &|span, which, message| err(span, field(which), message),
        )?;
        vips.push(VipConfig {
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
        });
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
        Some(b) => Some(validate_bgp(b.into_inner(), &err)?),
    };
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
                        drain_time: Duration::from_secs(a.drain_time),
                    })
                }
            }
        }
    };
    Ok(Config {
        bgp,
        kernel_routes,
        backend,
        node: NodeConfig {
            role,
            interfaces: node.interfaces.into_inner(),
            attach: node.attach,
            source_v4: node.source_v4,
            source_v6: node.source_v6,
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
