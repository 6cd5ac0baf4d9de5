//! The established flow's cost against how full the tables are: conntrack entries and VIPs.

use std::fmt::Write as _;

use vip_common::{IPPROTO_TCP, layout::DEFAULT_TABLE_SIZE};
use vip_tests::{fixture::*, packet::*};

use crate::harness::Harness;

/// Established-flow cost with 1, 1,000 and 1,000,000 flows in conntrack, and with 1, 100 and
/// 10,000 VIPs configured: hash and array lookups should not grow with their fill (cache
/// misses aside).
pub(crate) fn table_scaling(md: &mut String, harness: &mut Harness) {
    let frame = Frame::tcp("198.18.50.1", 40001, "198.18.100.1", 80, TCP_ACK).build();
    let spec = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1]);

    let mut lb = Lb::with_sizes(DEFAULT_TABLE_SIZE, 2_200_000);
    lb.backend(0, "198.18.1.1").backend(1, "198.18.1.2");
    let vip_id = lb.vip(&spec);
    writeln!(md, "\n## Established flow vs table fill\n").unwrap();
    writeln!(
        md,
        "Same method. Conntrack is filled with other flows first; VIPs are added around the \
         measured one (table size 251 for them all).\n"
    )
    .unwrap();
    fill_levels(
        (md, harness),
        (&mut lb, &frame),
        ("flows in conntrack", [1, 1_000, 1_000_000]),
        |lb, filled| {
            let mut flow = vip_common::FlowKey::v4(
                (0xc612_0000u32 + (filled >> 16)).to_be_bytes(),
                [198, 18, 100, 1],
                IPPROTO_TCP,
            );
            flow.set_ports((filled as u16).to_be_bytes(), 80u16.to_be_bytes());
            let entry = vip_common::ConnEntry {
                backend: filled % 2,
                vip_id,
                last_seen_ns: 0,
                flow_hash: 0,
                backend_tag: 0,
                flags: 0,
            };
            lb.dataplane
                .insert_flow(&flow, &entry)
                .expect("fill conntrack");
        },
    );
    drop(lb);

    const MANY: u32 = 10_000;
    let mut lb = Lb::with_options(vip_agent::dataplane::DataplaneOptions {
        table_size: 251,
        table_slots: MANY + 8,
        max_vips: MANY + 8,
        ..Default::default()
    });
    lb.backend(0, "198.18.1.1").backend(1, "198.18.1.2");
    lb.vip(&spec);
    fill_levels(
        (md, harness),
        (&mut lb, &frame),
        ("VIPs configured", [1, 100, MANY]),
        |lb, configured| {
            let addr = format!("198.19.{}.{}", configured / 250, 1 + configured % 250);
            lb.vip(&VipSpec::new(&addr, IPPROTO_TCP, 80, &[0, 1]));
        },
    );
}

/// Times the established flow `frame` through `lb` at each of `levels` of fill (`what`),
/// `grow` adding the `i`th item (from 1) between them, and writes the table.
fn fill_levels(
    (md, harness): (&mut String, &mut Harness),
    (lb, frame): (&mut Lb, &[u8]),
    (what, levels): (&str, [u32; 3]),
    mut grow: impl FnMut(&mut Lb, u32),
) {
    writeln!(md, "\n| {what} | established TCP net ns |\n|---:|---:|").unwrap();
    let mut filled = 1u32;
    for level in levels {
        while filled < level {
            grow(lb, filled);
            filled += 1;
        }
        writeln!(md, "| {level} | {:.1} |", harness.established_ns(lb, frame)).unwrap();
    }
}
