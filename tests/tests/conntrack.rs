//! Connection tracking: established flows stay on their backend when the table changes; SYNs
//! take the new table; removed backends are never used; SYN floods do not evict flows; UDP
//! entries expire when idle; the per-CPU flow caches in front of the tables follow them; a full
//! bucket evicts its least recently used flow; a torn way is no entry.

use std::{net::IpAddr, thread, time::Duration};

use aya::maps::{Array, MapData};
use vip_common::{
    ConnEntry, FlowKeyV4, IPPROTO_TCP, IPPROTO_UDP,
    conntrack::{ConntrackBucket, ConntrackKey, bucket_bits},
    layout,
};
use vip_tests::{fixture::*, packet::*};

fn outer_dst(lb: &mut Lb, frame: &Frame) -> IpAddr {
    let (action, out) = lb.run(&frame.build());
    assert_eq!(action, XDP_TX, "{frame:?}");
    decode_encapsulated(&out).outer_dst
}

/// A SYN and the handshake's first ACK (which records the flow); the backend both went to.
fn handshake(lb: &mut Lb, syn: &Frame) -> IpAddr {
    let to = outer_dst(lb, syn);
    let ack = Frame {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    };
    assert_eq!(outer_dst(lb, &ack), to, "the ACK left its SYN's backend");
    to
}

fn four_backends(lb: &mut Lb) {
    lb.backend(0, "198.18.1.1")
        .backend(1, "198.18.1.2")
        .backend(2, "198.18.1.3")
        .backend(3, "198.18.1.4");
}

#[test]
fn established_flows_keep_their_backend_after_a_table_change() {
    let mut lb = Lb::new();
    four_backends(&mut lb);
    let before = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]);
    lb.vip(&before);
    let flows: Vec<Frame> = (0..300)
        .map(|i| Frame::tcp("198.18.50.1", 10_000 + i, "198.18.100.1", 80, TCP_ACK))
        .collect();
    let original: Vec<IpAddr> = flows.iter().map(|f| outer_dst(&mut lb, f)).collect();
    for f in &flows {
        let entry = lb
            .dataplane
            .conntrack(&f.flow())
            .unwrap()
            .expect("conntrack entry");
        assert!(entry.backend <= 2);
    }

    // Add a backend: Maglev moves about a quarter of the flows to it.
    let after = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2, 3]);
    lb.vip(&after);
    let moved: Vec<usize> = (0..flows.len())
        .filter(|&i| lb.backend_addr(lb.predict(&after, &flows[i].flow()).0) != original[i])
        .collect();
    assert!(
        moved.len() > 30,
        "the new table moves only {} flows",
        moved.len()
    );
    for (f, addr) in flows.iter().zip(&original) {
        assert_eq!(
            outer_dst(&mut lb, f),
            *addr,
            "established flow moved: {f:?}"
        );
    }

    // A SYN on the same 5-tuple is a new connection: it takes the new table, and the flow's
    // later packets follow it.
    for &i in &moved {
        let syn = Frame {
            tcp_flags: TCP_SYN,
            ..flows[i].clone()
        };
        let new = outer_dst(&mut lb, &syn);
        assert_ne!(new, original[i]);
        assert_eq!(new, lb.backend_addr(lb.predict(&after, &syn.flow()).0));
        assert_eq!(outer_dst(&mut lb, &flows[i]), new);
    }
}

#[test]
fn removed_backend_is_never_used() {
    let mut lb = Lb::new();
    four_backends(&mut lb);
    lb.vip(&VipSpec::new(
        "198.18.100.1",
        IPPROTO_TCP,
        80,
        &[0, 1, 2, 3],
    ));
    let flows: Vec<Frame> = (0..200)
        .map(|i| Frame::tcp("198.18.50.1", 20_000 + i, "198.18.100.1", 80, TCP_SYN))
        .collect();
    let removed: IpAddr = "198.18.1.4".parse().unwrap();
    let original: Vec<IpAddr> = flows.iter().map(|f| handshake(&mut lb, f)).collect();
    assert!(original.iter().filter(|&&a| a == removed).count() > 20);

    // The agent's order: new table without it, then the backend slot is emptied.
    let after = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]);
    lb.vip(&after);
    lb.remove_backend(3);
    for (f, was) in flows.iter().zip(&original) {
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..f.clone()
        };
        let got = outer_dst(&mut lb, &ack);
        if *was == removed {
            // Re-hashed onto the new table.
            assert_eq!(got, lb.backend_addr(lb.predict(&after, &ack.flow()).0));
        } else {
            // Untouched by the removal.
            assert_eq!(got, *was, "a flow of a surviving backend moved");
        }
    }
}

/// 100 real clients with established connections to 198.18.100.1:80 (backends 0-2), for the
/// flood tests.
struct RealClients {
    syns: Vec<Frame>,
    backends: Vec<IpAddr>,
}

impl RealClients {
    fn connect(lb: &mut Lb) -> Self {
        four_backends(lb);
        lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]));
        let syns: Vec<Frame> = (0..100)
            .map(|i| Frame::tcp("198.18.50.1", 30_000 + i, "198.18.100.1", 80, TCP_SYN))
            .collect();
        let backends = syns.iter().map(|f| handshake(lb, f)).collect();
        Self { syns, backends }
    }

    /// The flows are still pinned: a table change (a fourth backend) moves none of them.
    fn assert_pinned_across_a_table_change(&self, lb: &mut Lb) {
        lb.vip(&VipSpec::new(
            "198.18.100.1",
            IPPROTO_TCP,
            80,
            &[0, 1, 2, 3],
        ));
        for (syn, was) in self.syns.iter().zip(&self.backends) {
            let ack = Frame {
                tcp_flags: TCP_ACK,
                ..syn.clone()
            };
            assert_eq!(outer_dst(lb, &ack), *was, "an established flow moved");
        }
    }
}

#[test]
fn a_syn_flood_cannot_evict_established_flows() {
    // 1,024 entries: a flood four times that size would have emptied it if SYNs were recorded.
    let mut lb = Lb::with_sizes(SMALL_TABLE, 1_024);
    let clients = RealClients::connect(&mut lb);
    assert_eq!(lb.dataplane.flows().unwrap().len(), clients.syns.len());

    for i in 0..4_096u32 {
        let spoofed = format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250);
        let syn = Frame::tcp(&spoofed, 1_024 + i as u16, "198.18.100.1", 80, TCP_SYN);
        let (action, _) = lb.run(&syn.build());
        assert_eq!(action, XDP_TX);
    }
    assert_eq!(
        lb.dataplane.flows().unwrap().len(),
        clients.syns.len(),
        "the SYN flood left entries in conntrack"
    );

    clients.assert_pinned_across_a_table_change(&mut lb);
}

/// A flood of new flows that the SYN rule cannot stop (spoofed ACKs, each from another source):
/// with an insert limit, each CPU records at most its budget per window; the rest are forwarded
/// by Maglev without an entry, and the real clients' flows stay pinned.
#[test]
fn an_ack_flood_is_held_to_the_insert_limit() {
    let mut lb = Lb::with_sizes(SMALL_TABLE, 1_024);
    let clients = RealClients::connect(&mut lb);

    // 1,000 per second: one insert per ~1 ms window.
    lb.dataplane.set_conntrack_insert_limit(1_000).unwrap();
    const FLOOD: u32 = 2_048;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let spoofed = format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250);
        let ack = Frame::tcp(&spoofed, 1_024 + i as u16, "198.18.100.1", 80, TCP_ACK);
        let (action, _) = lb.run(&ack.build());
        assert_eq!(action, XDP_TX, "flood packets are still forwarded");
    }
    let windows = started.elapsed().as_nanos() as u64 / (1 << vip_common::INSERT_WINDOW_SHIFT) + 2;
    let recorded = (lb.dataplane.flows().unwrap().len() - clients.syns.len()) as u64;
    let skipped = lb.dataplane.stats().unwrap().conntrack_insert_skipped;
    assert!(
        recorded <= windows,
        "{recorded} flood flows recorded in {windows} windows of one insert each"
    );
    assert_eq!(
        recorded + skipped,
        u64::from(FLOOD),
        "every flood flow recorded or counted"
    );

    clients.assert_pinned_across_a_table_change(&mut lb);
}

#[test]
fn udp_entries_expire_when_idle() {
    let mut lb = Lb::new();
    four_backends(&mut lb);
    let mut before = VipSpec::new("198.18.100.1", IPPROTO_UDP, 53, &[0, 1]);
    before.udp_idle_timeout = Duration::from_millis(300);
    lb.vip(&before);
    let flows: Vec<Frame> = (0..200)
        .map(|i| Frame::udp("198.18.50.1", 30_000 + i, "198.18.100.1", 53))
        .collect();
    let original: Vec<IpAddr> = flows.iter().map(|f| outer_dst(&mut lb, f)).collect();

    let mut after = before.clone();
    after.backends = vec![(2, 1), (3, 1)];
    lb.vip(&after);
    // Within the idle time: conntrack keeps every flow where it was.
    for (f, addr) in flows.iter().zip(&original) {
        assert_eq!(outer_dst(&mut lb, f), *addr);
    }
    // Idle past the timeout (coarse clock: a few ms resolution): flows re-hash to the new table.
    thread::sleep(Duration::from_millis(600));
    for f in &flows {
        let got = outer_dst(&mut lb, f);
        assert_eq!(got, lb.backend_addr(lb.predict(&after, &f.flow()).0));
    }
}

#[test]
fn tcp_entries_do_not_expire() {
    let mut lb = Lb::new();
    four_backends(&mut lb);
    let mut before = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1]);
    before.udp_idle_timeout = Duration::from_nanos(1); // applies to UDP only
    lb.vip(&before);
    let flows: Vec<Frame> = (0..100)
        .map(|i| Frame::tcp("198.18.50.1", 40_000 + i, "198.18.100.1", 80, TCP_ACK))
        .collect();
    let original: Vec<IpAddr> = flows.iter().map(|f| outer_dst(&mut lb, f)).collect();
    let mut after = before.clone();
    after.backends = vec![(2, 1), (3, 1)];
    lb.vip(&after);
    thread::sleep(Duration::from_millis(50));
    for (f, addr) in flows.iter().zip(&original) {
        assert_eq!(outer_dst(&mut lb, f), *addr);
    }
}

#[test]
fn a_removed_vip_keeps_no_flows_even_when_its_id_is_reused() {
    let mut lb = Lb::new();
    four_backends(&mut lb);
    let mut a = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]);
    a.vip_id = Some(5);
    lb.vip(&a);
    let to_a = Frame::tcp("198.18.50.1", 4242, "198.18.100.1", 80, TCP_ACK);
    assert_eq!(
        outer_dst(&mut lb, &to_a),
        "198.18.1.1".parse::<IpAddr>().unwrap()
    );
    assert!(lb.dataplane.conntrack(&to_a.flow()).unwrap().is_some());

    // A goes; B comes with A's id and backend. A's conntrack entry is still there.
    lb.remove_vip(&a.key());
    let mut b = VipSpec::new("198.18.100.2", IPPROTO_TCP, 80, &[0]);
    b.vip_id = Some(5);
    lb.vip(&b);
    assert!(lb.dataplane.conntrack(&to_a.flow()).unwrap().is_some());
    let (action, out) = lb.run(&to_a.build());
    assert_eq!(action, XDP_PASS, "a flow of a removed VIP was forwarded");
    assert_eq!(out, to_a.build());
    // B works.
    let to_b = Frame::tcp("198.18.50.1", 4242, "198.18.100.2", 80, TCP_ACK);
    assert_eq!(
        outer_dst(&mut lb, &to_b),
        "198.18.1.1".parse::<IpAddr>().unwrap()
    );
}

/// The client and VIP of each family: both have a per-CPU flow cache in front of their map.
const FAMILIES: [(&str, &str); 2] = [
    ("198.18.50.1", "198.18.100.1"),
    ("fd00:50::1", "fd00:100::1"),
];

/// Entries are served from each CPU's flow cache, but the table stays the record: an entry
/// written there is followed once the cached copy is re-read (32 jiffies: at most 320 ms).
#[test]
fn the_flow_cache_follows_the_conntrack_map() {
    for (client, vip) in FAMILIES {
        let mut lb = Lb::new();
        four_backends(&mut lb);
        lb.vip(&VipSpec::new(vip, IPPROTO_TCP, 80, &[0, 1, 2]));
        let flow = Frame::tcp(client, 5555, vip, 80, TCP_ACK);
        let first = outer_dst(&mut lb, &flow);
        let mut entry = lb.dataplane.conntrack(&flow.flow()).unwrap().unwrap();
        entry.backend = (entry.backend + 1) % 3;
        // An entry counts only with its backend's tag.
        entry.backend_tag = lb
            .dataplane
            .backends()
            .unwrap()
            .into_iter()
            .find(|(id, _)| *id == entry.backend)
            .expect("the backend")
            .1
            .tag;
        lb.dataplane.insert_flow(&flow.flow(), &entry).unwrap();
        thread::sleep(Duration::from_millis(400));
        let now = outer_dst(&mut lb, &flow);
        assert_ne!(now, first, "{vip}: the cached copy outlived its refresh");
        assert_eq!(now, lb.backend_addr(entry.backend), "{vip}");
    }
}

/// A UDP flow served from the cache keeps its shared entry's time current (renewed there each
/// time the cached copy is re-read): another CPU, or the agent, sees an active flow.
#[test]
fn an_active_udp_flow_keeps_its_conntrack_entry_fresh() {
    for (client, vip) in FAMILIES {
        let mut lb = Lb::new();
        four_backends(&mut lb);
        lb.vip(&VipSpec::new(vip, IPPROTO_UDP, 53, &[0, 1, 2]));
        let flow = Frame::udp(client, 5353, vip, 53);
        let to = outer_dst(&mut lb, &flow);
        let first = lb.dataplane.conntrack(&flow.flow()).unwrap().unwrap();
        for _ in 0..30 {
            thread::sleep(Duration::from_millis(50));
            assert_eq!(outer_dst(&mut lb, &flow), to, "{vip}");
        }
        let last = lb.dataplane.conntrack(&flow.flow()).unwrap().unwrap();
        let advanced = Duration::from_nanos(last.last_seen_ns - first.last_seen_ns);
        // 1.5 s of traffic; the shared time lags the cached one by at most one refresh (320 ms).
        assert!(
            advanced >= Duration::from_millis(1_000),
            "{vip}: the shared entry's time advanced only {advanced:?} in 1.5 s of traffic"
        );
    }
}

/// A SYN that reuses a tracked 5-tuple takes the table's answer, and the flow's next packets
/// follow it, also where they would be served from this CPU's cached copy of the old entry.
#[test]
fn a_reused_five_tuple_replaces_the_cached_entry() {
    for (client, vip) in FAMILIES {
        let mut lb = Lb::new();
        four_backends(&mut lb);
        let before = VipSpec::new(vip, IPPROTO_TCP, 80, &[0, 1, 2, 3]);
        lb.vip(&before);
        // A flow whose backend the table change below moves.
        let after = VipSpec::new(vip, IPPROTO_TCP, 80, &[0, 1, 2]);
        let syn = (1..1000)
            .map(|port| Frame::tcp(client, port, vip, 80, TCP_SYN))
            .find(|f| lb.predict(&before, &f.flow()) != lb.predict(&after, &f.flow()))
            .expect("a flow the change moves");
        let old = handshake(&mut lb, &syn);
        lb.vip(&after);
        let ack = Frame {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        assert_eq!(
            outer_dst(&mut lb, &ack),
            old,
            "{vip}: conntrack kept the flow"
        );
        let new = lb.backend_addr(lb.predict(&after, &syn.flow()).0);
        assert_eq!(
            outer_dst(&mut lb, &syn),
            new,
            "{vip}: the SYN took the table"
        );
        assert_eq!(
            outer_dst(&mut lb, &ack),
            new,
            "{vip}: the next packet left the new SYN's backend"
        );
    }
}

/// Gives backend `id` a tag, as the agent does (a hash of its VIP and address).
fn set_tag(lb: &mut Lb, id: vip_common::BackendId, tag: u16) {
    let (_, mut backend) = lb
        .dataplane
        .backends()
        .unwrap()
        .into_iter()
        .find(|(i, _)| *i == id)
        .expect("backend present");
    backend.tag = tag;
    lb.dataplane.set_backend(id, &backend).unwrap();
}

/// Backend ids are reused: a flow pinned to an id's earlier holder must not follow the id to
/// the backend that holds it now (perhaps another VIP's), but re-hash in its own VIP's table.
/// While the holder stays (same tag), the flow stays with it across table changes.
#[test]
fn a_reused_backend_id_does_not_inherit_the_flows_of_its_earlier_holder() {
    let mut lb = Lb::new();
    lb.backend(0, "198.18.1.1").backend(1, "198.18.1.2");
    set_tag(&mut lb, 0, 0x1111);
    set_tag(&mut lb, 1, 0x2222);
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    let flow = Frame::tcp("198.18.50.1", 7777, "198.18.100.1", 80, TCP_ACK);
    assert_eq!(outer_dst(&mut lb, &flow), lb.backend_addr(0));

    // The table changes; the holder of id 0 does not: the flow stays pinned.
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[1]));
    assert_eq!(outer_dst(&mut lb, &flow), lb.backend_addr(0));

    // Id 0 goes to another backend (as the agent reuses a released id).
    lb.backend(0, "198.18.9.9");
    set_tag(&mut lb, 0, 0x3333);
    assert_eq!(
        outer_dst(&mut lb, &flow),
        lb.backend_addr(1),
        "the flow followed its backend's id to a new holder"
    );
}

/// The agent reads conntrack through its mapping of the tables (flow-state sharing scans it
/// after every table change): every entry of both tables, each once, with its value. The
/// tables are sized so that no bucket gets a fifth of these flows (at a tenth of the table,
/// buckets overflow about once in 10^7).
#[test]
fn every_entry_is_read_once() {
    let mut lb = Lb::with_sizes(SMALL_TABLE, 262_144);
    let mut written = std::collections::HashMap::new();
    for i in 0..10_000u32 {
        let (client, vip) = if i % 4 == 0 {
            (format!("fd00:18::{:x}", i + 1), "fd00:100::1")
        } else {
            (
                format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250),
                "198.18.100.1",
            )
        };
        let flow = Frame::tcp(&client, 1_024 + (i % 7) as u16, vip, 80, TCP_ACK).flow();
        let entry = ConnEntry {
            backend: i % 5,
            vip_id: 0,
            last_seen_ns: u64::from(i),
            flow_hash: i,
            backend_tag: 0,
            flags: (i % 2) as u16,
        };
        lb.dataplane.insert_flow(&flow, &entry).unwrap();
        written.insert(flow, entry);
    }
    let read = lb.dataplane.flows().unwrap();
    assert_eq!(read.len(), written.len(), "each entry once");
    for (flow, entry) in &read {
        assert_eq!(written.get(flow), Some(entry), "{flow:?}");
    }
}

/// `count` IPv4 flows to `vip` whose keys pick the same bucket of a table of `2^bits` buckets.
fn bucket_mates(vip: &str, bits: u32, count: usize) -> Vec<Frame> {
    let frame = |i: u16| Frame::tcp("198.18.50.1", 10_000 + i, vip, 80, TCP_ACK);
    let bucket = |f: &Frame| FlowKeyV4::of(&f.flow()).bucket(bits);
    let target = bucket(&frame(0));
    let mates: Vec<Frame> = (0..u16::MAX - 10_000)
        .map(frame)
        .filter(|f| bucket(f) == target)
        .take(count)
        .collect();
    assert_eq!(mates.len(), count, "flows sharing a bucket");
    mates
}

/// A full bucket takes a new flow in the way of its least recently used flow, and a flow read
/// from the table (its flow-cache copy missing or stale) counts as used.
#[test]
fn a_full_bucket_evicts_its_least_recently_used_flow() {
    let entries = 1_024;
    let mut lb = Lb::with_sizes(SMALL_TABLE, entries);
    four_backends(&mut lb);
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]));
    let flows = bucket_mates("198.18.100.1", bucket_bits(entries), 6);
    // Four flows fill the bucket, written as the agent writes peers' flows: their last use
    // long ago, the second the oldest.
    outer_dst(&mut lb, &flows[0]);
    let template = lb.dataplane.conntrack(&flows[0].flow()).unwrap().unwrap();
    for (flow, seen) in flows[..4].iter().zip([4_000, 1_000, 3_000, 2_000]) {
        let entry = ConnEntry {
            last_seen_ns: seen,
            ..template
        };
        lb.dataplane.insert_flow(&flow.flow(), &entry).unwrap();
    }
    let tracked = |lb: &Lb, flows: &[Frame]| -> Vec<bool> {
        flows
            .iter()
            .map(|f| lb.dataplane.conntrack(&f.flow()).unwrap().is_some())
            .collect()
    };
    assert_eq!(tracked(&lb, &flows[..5]), [true, true, true, true, false]);
    // A fifth flow's first ACK replaces the least recently used.
    outer_dst(&mut lb, &flows[4]);
    assert_eq!(tracked(&lb, &flows[..5]), [true, false, true, true, true]);
    // The fourth (this CPU's cache never saw it) is read from the table, so used now; a sixth
    // flow then replaces the third, the least recently used left.
    outer_dst(&mut lb, &flows[3]);
    outer_dst(&mut lb, &flows[5]);
    assert_eq!(tracked(&lb, &flows), [true, false, false, true, true, true]);
}

/// A way whose words do not all come from one write (two CPUs, or a CPU and the agent, writing
/// it at once; a read in the middle of a write) is no entry: its flow takes the table's answer,
/// not the backend the half-written way names, and the agent does not list it.
#[test]
fn a_torn_way_reads_as_no_entry() {
    let entries = 1_024;
    let mut lb = Lb::with_sizes(SMALL_TABLE, entries);
    four_backends(&mut lb);
    let spec = VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0, 1, 2]);
    lb.vip(&spec);
    let flow = Frame::tcp("198.18.50.9", 30_000, "198.18.100.1", 80, TCP_ACK);
    let (maglev, _) = lb.predict(&spec, &flow.flow());
    let other = (maglev + 1) % 3;
    // The agent's entry sends the flow to another backend than the table's...
    let template = {
        let probe = Frame::tcp("198.18.50.10", 30_000, "198.18.100.1", 80, TCP_ACK);
        outer_dst(&mut lb, &probe);
        lb.dataplane.conntrack(&probe.flow()).unwrap().unwrap()
    };
    let entry = ConnEntry {
        backend: other,
        ..template
    };
    lb.dataplane.insert_flow(&flow.flow(), &entry).unwrap();
    assert_eq!(lb.dataplane.conntrack(&flow.flow()).unwrap(), Some(entry));

    // ... and is then torn: another write's backend over it, the check word left as it was.
    let table = map_of(&mut lb, layout::CT_TABLE_V4);
    let mut table: Array<MapData, ConntrackBucket<FlowKeyV4>> =
        Array::try_from(aya::maps::Map::Array(table)).unwrap();
    let key = FlowKeyV4::of(&flow.flow());
    let index = key.bucket(bucket_bits(entries));
    let mut bucket = table.get(&index, 0).unwrap();
    let way = bucket.position(&key).expect("the agent's way");
    bucket.ways[way].entry.backend = 3;
    table.set(index, bucket, 0).unwrap();

    assert_eq!(lb.dataplane.conntrack(&flow.flow()).unwrap(), None);
    assert!(
        lb.dataplane
            .flows()
            .unwrap()
            .iter()
            .all(|(f, _)| *f != flow.flow())
    );
    assert_eq!(
        outer_dst(&mut lb, &flow),
        lb.backend_addr(maglev),
        "the torn way's flow took the table's answer"
    );
}

/// The map `name` of the loaded program, as bpftool finds it: by the program's map ids.
fn map_of(lb: &mut Lb, name: &str) -> MapData {
    let ids = lb
        .dataplane
        .program()
        .unwrap()
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .expect("map ids");
    ids.into_iter()
        .find_map(|id| {
            let map = MapData::from_id(id).ok()?;
            let info = map.info().ok()?;
            (info.name_as_str() == Some(name)).then_some(map)
        })
        .unwrap_or_else(|| panic!("the program has no map {name}"))
}
