//! How a packet leaves: XDP_TX (the next hop is on the arrival interface) against a redirect
//! (it is on another), with live frames that the kernel really sends out of veths, in a
//! namespace of the section's own thread. Every way sends the same frame out of the same
//! interface (the downlink) and only its arrival differs: two veths of one namespace differ by
//! 10-16 ns per frame between themselves, which a comparison of ways leaving by different
//! interfaces would count. The redirect goes through `TX_PORTS`, the devmap the agent fills; in
//! every other round the downlink's entry is taken out of it, so those rounds redirect by
//! ifindex, as the datapath does for an interface the agent has not put there.

use std::fmt::Write as _;

use aya::maps::{DevMapHash, MapData};
use vip_common::{IPPROTO_TCP, layout::TX_PORTS};
use vip_tests::{fixture::*, live::Links, packet::*};

use crate::harness::{Harness, median, program_fd};

/// Rounds (each times all three ways once), and frames per timed run.
const ROUNDS: usize = 21;
const FRAMES: u32 = 50_000;

/// `lb`'s `TX_PORTS`, opened by id from its program (the agent offers no way to take an
/// interface out: the bench does it to time the ifindex path of the same program).
fn tx_ports(lb: &mut Lb) -> DevMapHash<MapData> {
    let info = lb
        .dataplane
        .program()
        .unwrap()
        .info()
        .expect("program info");
    let map = info
        .map_ids()
        .expect("map ids")
        .expect("the program's maps")
        .into_iter()
        .map(|id| MapData::from_id(id).expect("map by id"))
        .find(|m| {
            m.info()
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned))
                == Some(TX_PORTS.to_owned())
        })
        .expect("TX_PORTS");
    DevMapHash::try_from(aya::maps::Map::DevMapHash(map)).expect("a devmap")
}

pub(crate) fn leaving(md: &mut String) {
    let rows = std::thread::spawn(|| {
        let links = Links::new();
        let mut harness = Harness::load();
        let mut lb = Lb::new();
        lb.backend_via(0, "198.18.1.2", Some(links.downlink));
        lb.vip(&VipSpec::new("198.18.100.2", IPPROTO_TCP, 80, &[0]));
        let frame = Frame::tcp("198.18.50.1", 40000, "198.18.100.2", 80, TCP_ACK).build();
        assert_eq!(lb.run_on(&frame, links.downlink).0, XDP_TX);
        assert_eq!(lb.run_on(&frame, links.uplink).0, XDP_REDIRECT);
        let mut ports = tx_ports(&mut lb);
        let fd = program_fd(&mut lb);
        let mut samples = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            samples[0].push(harness.time_live(&fd, &frame, links.downlink, FRAMES));
            samples[1].push(harness.time_live(&fd, &frame, links.uplink, FRAMES));
            ports.remove(links.downlink).expect("take the downlink out");
            samples[2].push(harness.time_live(&fd, &frame, links.uplink, FRAMES));
            ports
                .insert(links.downlink, links.downlink, None, 0)
                .expect("put the downlink back");
        }
        let received = (
            links.received(vip_tests::live::UPLINK),
            links.received(vip_tests::live::DOWNLINK),
        );
        let sent = u64::from(FRAMES) * ROUNDS as u64;
        assert_eq!(received, (0, 3 * sent), "every frame left where it should");
        samples.map(median)
    })
    .join()
    .expect("the live-frames thread");
    let [tx, devmap, ifindex] = rows;
    writeln!(md, "\n## Leaving by XDP_TX or by redirect (live frames)\n").unwrap();
    writeln!(
        md,
        "An established TCP flow's packets through the load balancer behind the restoring \
         wrapper, run with `BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel carries out the action \
         and the frames really leave, out of veths in a private namespace whose far ends drop \
         them with an XDP program. Every way sends the same frame out of the same veth; only \
         its arrival interface differs (two veths differ by 10-16 ns per frame between \
         themselves). In this mode the kernel turns XDP_TX into a redirect back out of the \
         arrival interface by ifindex without a helper call (a driver's own XDP_TX is not \
         reachable from a test run). Median of {ROUNDS} rounds of {FRAMES} frames, batches of \
         64; raw ns per frame, all rounds the same program; \"by ifindex\": the downlink taken out of `TX_PORTS` in \
         those runs, as for an interface the agent has not written.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| leaving by | ns per frame | vs XDP_TX |\n|---|---:|---:|"
    )
    .unwrap();
    writeln!(
        md,
        "| XDP_TX (next hop on the arrival interface) | {tx:.1} | |"
    )
    .unwrap();
    writeln!(
        md,
        "| redirect through `TX_PORTS` (devmap) | {devmap:.1} | {:+.1} |",
        devmap - tx
    )
    .unwrap();
    writeln!(
        md,
        "| redirect by ifindex (`bpf_redirect`) | {ifindex:.1} | {:+.1} |",
        ifindex - tx
    )
    .unwrap();
}
