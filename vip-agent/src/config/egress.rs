//! `[[egress]]`: the checks that span the section, the node's VIPs and its role.

use std::{collections::HashSet, time::Duration};

use toml::Spanned;

use super::{
    error::ConfigError,
    raw::RawEgress,
    types::{BackendRole, EgressBackend, EgressConfig, VipConfig},
    validate::{Located, not_unicast},
};

/// Longest rest of a block: a day.
const MAX_REST_SECS: u64 = 86_400;

/// What the egress sections need to know about the node.
pub(super) struct EgressContext<'a> {
    /// The load balancer's VIPs (empty on a backend).
    pub(super) vips: &'a [VipConfig],
    /// The backend role's settings (`None` on a load balancer).
    pub(super) backend: Option<&'a BackendRole>,
    /// Entries of an owner table: a load balancer keeps one per egress VIP in a Maglev slot.
    pub(super) table_size: u32,
}

/// Every `[[egress]]` section, checked; every mistake is reported at once.
pub(super) fn validate(
    raw: Vec<Spanned<RawEgress>>,
    node: &EgressContext,
    err: &Located,
) -> Result<Vec<EgressConfig>, ConfigError> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, section) in raw.into_iter().enumerate() {
        let section = section.into_inner();
        if !seen.insert(*section.vip.get_ref()) {
            errors.push(err(
                &section.vip.span(),
                format!("egress[{i}].vip"),
                format!("{} has two [[egress]] sections", section.vip.get_ref()),
            ));
            continue;
        }
        match one(i, section, node, err) {
            Ok(e) => out.push(e),
            Err(e) => errors.push(e),
        }
    }
    match ConfigError::all(errors) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn one(
    i: usize,
    e: RawEgress,
    node: &EgressContext,
    err: &Located,
) -> Result<EgressConfig, ConfigError> {
    let field = |f: &str| format!("egress[{i}].{f}");
    let vip = *e.vip.get_ref();
    if let Some(why) = not_unicast(vip) {
        return Err(err(
            &e.vip.span(),
            field("vip"),
            format!("{vip} is {why}: an egress address must be a unicast VIP"),
        ));
    }
    match node.backend {
        Some(role) if !role.vips.contains(&vip) => {
            return Err(err(
                &e.vip.span(),
                field("vip"),
                format!("{vip} is not in backend.vips: the VIP must be on this backend's lo"),
            ));
        }
        None if !node.vips.iter().any(|v| v.address == vip) => {
            return Err(err(
                &e.vip.span(),
                field("vip"),
                format!(
                    "{vip} is no [[vip]] address of this node: egress replies are encapsulated \
                     as that VIP's packets are"
                ),
            ));
        }
        _ => {}
    }
    let (first_port, last_port) =
        parse_ports(e.ports.get_ref()).map_err(|m| err(&e.ports.span(), field("ports"), m))?;
    let block_size = *e.block_size.get_ref();
    let ports = u32::from(last_port) - u32::from(first_port) + 1;
    if block_size == 0 || ports % u32::from(block_size) != 0 {
        return Err(err(
            &e.block_size.span(),
            field("block_size"),
            format!(
                "{block_size}: the range's {ports} ports must hold a whole number of blocks \
                 (a divisor of {ports})"
            ),
        ));
    }
    let blocks = ports / u32::from(block_size);
    if node.backend.is_none() && blocks > node.table_size {
        return Err(err(
            &e.block_size.span(),
            field("block_size"),
            format!(
                "{blocks} blocks do not fit an owner table of node.table_size = {} entries: \
                 use larger blocks",
                node.table_size
            ),
        ));
    }
    for (j, served) in node.vips.iter().enumerate() {
        if served.address != vip {
            continue;
        }
        let clash = match served.port {
            0 => Some("serves every port".to_string()),
            p if (first_port..=last_port).contains(&p) => {
                Some(format!("serves port {p}, inside the egress range"))
            }
            _ => None,
        };
        if let Some(clash) = clash {
            return Err(err(
                &e.ports.span(),
                field("ports"),
                format!(
                    "{first_port}-{last_port} overlaps a served port: vip[{j}] ({served}) {clash}"
                ),
            ));
        }
    }
    if e.rest > MAX_REST_SECS {
        return Err(err(
            &e.vip.span(),
            field("rest"),
            format!("{} s: at most {MAX_REST_SECS} s", e.rest),
        ));
    }
    let mut backends = Vec::new();
    let mut addresses = HashSet::new();
    let mut taken = HashSet::new();
    for (j, b) in e.backends.into_iter().enumerate() {
        let b = b.into_inner();
        let field = |f: &str| format!("egress[{i}].backend[{j}].{f}");
        let address = *b.address.get_ref();
        let block = *b.block.get_ref();
        let problem = if let Some(why) = not_unicast(address) {
            Some(format!("{address} is {why}"))
        } else if address.is_ipv4() != vip.is_ipv4() {
            Some(format!(
                "{address}: a backend's family must match the VIP's"
            ))
        } else if !addresses.insert(address) {
            Some(format!("{address} is listed twice"))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(err(&b.address.span(), field("address"), problem));
        }
        if u32::from(block) >= blocks {
            return Err(err(
                &b.block.span(),
                field("block"),
                format!("{block}: the range has blocks 0 to {}", blocks - 1),
            ));
        }
        if !taken.insert(block) {
            return Err(err(
                &b.block.span(),
                field("block"),
                format!("block {block} is already another backend's"),
            ));
        }
        backends.push(EgressBackend { address, block });
    }
    Ok(EgressConfig {
        vip,
        first_port,
        last_port,
        block_size,
        rest: Duration::from_secs(e.rest),
        backends,
    })
}

/// `"FIRST-LAST"`, both ports, FIRST at most LAST.
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let usage = || format!("{s:?} is not a port range FIRST-LAST, e.g. \"40000-40999\"");
    let (a, b) = s.split_once('-').ok_or_else(usage)?;
    let a: u16 = a.trim().parse().map_err(|_| usage())?;
    let b: u16 = b.trim().parse().map_err(|_| usage())?;
    if a == 0 || a > b {
        return Err(usage());
    }
    Ok((a, b))
}
