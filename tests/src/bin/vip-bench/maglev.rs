//! Maglev table builds and the movement when one backend leaves.

use std::{fmt::Write as _, time::Instant};

use vip_common::layout::DEFAULT_TABLE_SIZE;

use crate::harness::median;

/// Maglev table builds (userspace, single core) and the disruption of removing one backend.
pub(crate) fn maglev_builds(md: &mut String) {
    use vip_common::maglev::{MaglevBackend, MaglevTable};
    writeln!(md, "\n## Maglev table builds (one core)\n").unwrap();
    writeln!(
        md,
        "Median of 5 builds. \"moved\": slots that change when one backend leaves, against the \
         ideal (the removed backend's own slots, 1/N). Target: build under 5 ms at 1,000 backends; \
         moved within 1.2x of ideal plus the removed backend's share. Maglev's extra movement \
         grows as table size / backends shrinks; the last row shows the paper's larger table \
         (ten times the memory per VIP) for 1,000 backends.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| table size | backends | build ms | moved % | ideal % | ratio |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|").unwrap();
    let sizes = [
        (DEFAULT_TABLE_SIZE, 10u32),
        (DEFAULT_TABLE_SIZE, 100),
        (DEFAULT_TABLE_SIZE, 1_000),
        (655_373, 1_000),
    ];
    for (size, n) in sizes {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend {
                addr: std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
                weight: 1,
                id: i,
            })
            .collect();
        let mut times = Vec::new();
        let mut table = None;
        for _ in 0..5 {
            let start = Instant::now();
            table = Some(MaglevTable::build(size, &backends).unwrap());
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let table = table.unwrap();
        let after = MaglevTable::build(size, &backends[1..]).unwrap();
        let moved = table.moved_slots(&after) as f64 / f64::from(size) * 100.0;
        let ideal = 100.0 / f64::from(n);
        writeln!(
            md,
            "| {size} | {n} | {:.2} | {moved:.2} | {ideal:.2} | {:.2}x |",
            median(times),
            moved / ideal
        )
        .unwrap();
    }
}
