//! Maglev table statistics for a backend set, and how many slots move when it changes.

use std::net::IpAddr;

use anyhow::{Context, Result};
use vip_common::maglev::{MaglevBackend, MaglevTable};

/// `ADDR`, `ADDR:WEIGHT` or `[V6ADDR]:WEIGHT`.
fn parse_weighted(spec: &str) -> Result<(IpAddr, u32)> {
    if let Ok(addr) = spec.parse::<IpAddr>() {
        return Ok((addr, 1));
    }
    let (addr, weight) = spec.rsplit_once(':').context("not an address")?;
    Ok((addr.trim_matches(['[', ']']).parse()?, weight.parse()?))
}

/// Prints a table's shares and, with `remove`/`add`, the slots that move.
pub fn maglev(size: u32, specs: &[String], remove: &[IpAddr], add: &[String]) -> Result<()> {
    let mut backends = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (addr, weight) = parse_weighted(spec).with_context(|| {
            format!("backend {spec}: use ADDR or ADDR:WEIGHT (IPv6 with weight: [ADDR]:WEIGHT)")
        })?;
        backends.push(MaglevBackend {
            addr,
            weight,
            id: i as u32,
        });
    }
    let start = std::time::Instant::now();
    let table = MaglevTable::build(size, &backends)?;
    let took = start.elapsed();
    let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
    println!("table size {size}, built in {took:?}");
    println!(
        "{:<40} {:>6} {:>8} {:>8} {:>8}",
        "backend", "weight", "slots", "share", "ideal"
    );
    let mut worst: f64 = 0.0;
    for b in &backends {
        let slots = table.share(b.id);
        let share = slots as f64 / f64::from(size);
        let ideal = f64::from(b.weight) / f64::from(total_weight.max(1));
        if ideal > 0.0 {
            worst = worst.max((share / ideal - 1.0).abs());
        }
        println!(
            "{:<40} {:>6} {:>8} {:>7.3}% {:>7.3}%",
            b.addr.to_string(),
            b.weight,
            slots,
            share * 100.0,
            ideal * 100.0
        );
    }
    println!(
        "largest deviation from the weighted ideal: {:.3}%",
        worst * 100.0
    );
    if remove.is_empty() && add.is_empty() {
        return Ok(());
    }
    let mut changed: Vec<MaglevBackend> = backends
        .iter()
        .filter(|b| !remove.contains(&b.addr))
        .copied()
        .collect();
    for spec in add {
        let (addr, weight) = parse_weighted(spec).with_context(|| format!("--add {spec}"))?;
        changed.push(MaglevBackend {
            addr,
            weight,
            id: backends.len() as u32 + changed.len() as u32,
        });
    }
    let after = MaglevTable::build(size, &changed)?;
    let moved = table.moved_slots(&after);
    let removed_own: usize = backends
        .iter()
        .filter(|b| remove.contains(&b.addr))
        .map(|b| table.share(b.id))
        .sum();
    println!(
        "after removing {} and adding {}: {moved} slots move ({:.2}%), {removed_own} of them the \
         removed backends' own, {} others ({:.2}% of the table)",
        remove.len(),
        add.len(),
        moved as f64 / f64::from(size) * 100.0,
        moved - removed_own,
        (moved - removed_own) as f64 / f64::from(size) * 100.0
    );
    Ok(())
}
