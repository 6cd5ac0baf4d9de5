//! Pinned maps: the layout table matches the loaded object, a second load reuses the pinned
//! state (and fills its own, unpinned `TX_PORTS` from the pinned backends), a pinned map of the
//! wrong shape is refused, an upgrade keeps the flows of an earlier version's conntrack maps,
//! and bpftool decodes maps through BTF.

use std::{path::PathBuf, process::Command};

use aya::maps::MapInfo;
use vip_agent::dataplane::{Dataplane, DataplaneError, DataplaneOptions};
use vip_common::{
    BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, ConnEntry, FlowKey, FlowKeyV4, IPPROTO_TCP,
    IPPROTO_UDP, VipKey,
    conntrack::CONNTRACK_WAYS,
    layout::{LAYOUT, LEGACY_CONNTRACK_V4, LEGACY_CONNTRACK_V6},
};

/// A pin directory under bpffs, removed on drop (also when the test fails).
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/vip-test-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create pin dir (is bpffs mounted?)");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(pins: &PinDir) -> DataplaneOptions {
    DataplaneOptions {
        table_size: 251,
        table_slots: 4,
        conntrack_entries: 4096,
        max_vips: 64,
        max_backends: 256,
        pin_dir: Some(pins.0.clone()),
        datapath_log: false,
    }
}

#[test]
fn layout_matches_the_object_and_pins_are_reused_or_refused() {
    vip_tests::require_root();
    let pins = PinDir::new("layout");
    let opts = options(&pins);
    let mut first = Dataplane::load(opts.clone()).expect("first load");
    for l in LAYOUT {
        let info = MapInfo::from_pin(pins.0.join(l.name)).expect("pinned map");
        assert_eq!(
            (info.key_size(), info.value_size()),
            (l.key_size, l.value_size),
            "{}: key/value size of the object differs from vip_common::layout",
            l.name
        );
        let entries = match l.name {
            "MAGLEV" => opts.table_size * opts.table_slots,
            "CT_TABLE_V4" | "CT_TABLE_V6" => opts.conntrack_entries / CONNTRACK_WAYS as u32,
            "VIPS" | "VIP_META" => opts.max_vips,
            "BACKENDS" | "BACKEND_STATS" => opts.max_backends,
            _ => l.max_entries.expect("fixed size"),
        };
        assert_eq!(info.max_entries(), entries, "{}: entries", l.name);
    }

    // A second load (an agent restart) sees the first one's state.
    let key = VipKey::new("198.18.100.1".parse().unwrap(), IPPROTO_TCP, 80);
    let meta = bytemuck::Zeroable::zeroed();
    first.set_vip(&key, &meta).expect("write VIP");
    // A backend whose next hop is `lo` (its interface goes into TX_PORTS, which is not pinned).
    let mut backend: Backend = bytemuck::Zeroable::zeroed();
    backend.flags = BACKEND_F_PRESENT | BACKEND_F_NEXTHOP;
    backend.ifindex = 1;
    first.set_backend(7, &backend).expect("write backend");
    assert_eq!(first.tx_ports().unwrap(), [1]);
    let mut second = Dataplane::load(opts.clone()).expect("reload on the pinned maps");
    second
        .remove_vip(&key)
        .expect("the VIP written by the first load is there");
    assert_eq!(
        second.tx_ports().unwrap(),
        [1],
        "the reload put the pinned backends' interfaces into its own TX_PORTS"
    );

    // A different shape is refused with a clear error, and nothing is replaced.
    let wrong = DataplaneOptions {
        conntrack_entries: 8192,
        ..opts
    };
    match Dataplane::load(wrong) {
        Err(e @ DataplaneError::PinnedMapMismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains("CT_TABLE") && text.contains("2048"), "{text}");
        }
        Err(other) => panic!("expected a pinned-map mismatch, got {other}"),
        Ok(_) => panic!("a pinned map of another size was accepted"),
    }
    assert!(pins.0.join("CT_TABLE_V4").exists());
}

#[test]
fn bpftool_decodes_maps_through_btf() {
    vip_tests::require_root();
    let pins = PinDir::new("btf");
    let mut dp = Dataplane::load(options(&pins)).expect("load");
    let key = VipKey::new("198.18.100.1".parse().unwrap(), IPPROTO_TCP, 80);
    let meta = bytemuck::Zeroable::zeroed();
    dp.set_vip(&key, &meta).expect("write VIP");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.0.join("VIPS"))
        .output()
        .expect("bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    for field in [
        "\"formatted\"",
        "\"addr\"",
        "\"port\"",
        "\"proto\"",
        "\"vip_id\"",
        "\"src_v4\"",
    ] {
        assert!(json.contains(field), "bpftool output lacks {field}: {json}");
    }
}

/// `vip-agent detach` removes every pin of the datapath, also the maps earlier versions pinned
/// and this one no longer has (`layout::OBSOLETE_PINS`), so the pin directory goes too.
#[test]
fn detach_removes_every_pin_including_maps_of_earlier_versions() {
    vip_tests::require_root();
    let pins = PinDir::new("detach");
    drop(Dataplane::load(options(&pins)).expect("load"));
    for name in vip_common::layout::OBSOLETE_PINS {
        // As an earlier agent left it: a map of that name, pinned.
        let path = pins.0.join(name);
        let status = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args([
                "type", "array", "key", "4", "value", "16", "entries", "1", "name", name,
            ])
            .status()
            .expect("bpftool");
        assert!(status.success() && path.exists(), "pin {name}");
    }
    vip_agent::dataplane::detach_all(&pins.0).expect("detach");
    assert!(!pins.0.exists(), "the pin directory is still there");
}

/// An earlier version's conntrack LRU maps, pinned with flows in them: a load over them copies
/// every flow into the tables and unpins them.
#[test]
fn an_upgrade_copies_flows_from_the_earlier_conntrack_maps_and_unpins_them() {
    vip_tests::require_root();
    let pins = PinDir::new("adopt");
    let entry = |backend: u32| ConnEntry {
        backend,
        vip_id: 1,
        last_seen_ns: 1_000,
        flow_hash: 0x1234_5678,
        backend_tag: 9,
        flags: 0,
    };
    let mut v4 = FlowKey::v4([198, 18, 0, 7], [198, 19, 0, 1], IPPROTO_TCP);
    v4.set_ports(40_000u16.to_be_bytes(), 80u16.to_be_bytes());
    let mut v6 = FlowKey::v6(
        "fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        "fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        IPPROTO_UDP,
    );
    v6.set_ports(5_000u16.to_be_bytes(), 53u16.to_be_bytes());
    let decimal = |bytes: &[u8]| bytes.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    let legacy: [(&str, Vec<u8>, ConnEntry); 2] = [
        (
            LEGACY_CONNTRACK_V4,
            bytemuck::bytes_of(&FlowKeyV4::of(&v4)).to_vec(),
            entry(3),
        ),
        (
            LEGACY_CONNTRACK_V6,
            bytemuck::bytes_of(&v6).to_vec(),
            entry(4),
        ),
    ];
    for (name, key, value) in &legacy {
        // As the earlier agent made them: LRU hash maps with per-CPU LRU lists.
        let path = pins.0.join(name);
        let size = |n: usize| n.to_string();
        let created = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", "lru_hash", "key", &size(key.len()), "value", "24"])
            .args(["entries", "4096", "name", name, "flags", "2"])
            .status()
            .expect("bpftool");
        assert!(created.success(), "create {name}");
        let updated = Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(&path)
            .arg("key")
            .args(decimal(key))
            .arg("value")
            .args(decimal(bytemuck::bytes_of(value)))
            .status()
            .expect("bpftool");
        assert!(updated.success(), "update {name}");
    }
    let dp = Dataplane::load(options(&pins)).expect("load over the earlier maps");
    assert_eq!(dp.conntrack(&v4).unwrap(), Some(entry(3)));
    assert_eq!(dp.conntrack(&v6).unwrap(), Some(entry(4)));
    assert_eq!(dp.flows().unwrap().len(), 2);
    for (name, ..) in &legacy {
        assert!(!pins.0.join(name).exists(), "{name} is still pinned");
    }
}

/// A pin under an earlier conntrack map's name that is not such a map (another key size) is
/// refused with an error naming it, before anything is read from it, and stays pinned.
#[test]
fn an_earlier_conntrack_pin_of_another_shape_is_refused() {
    vip_tests::require_root();
    let pins = PinDir::new("adopt-bad");
    let path = pins.0.join(LEGACY_CONNTRACK_V4);
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type", "lru_hash", "key", "20", "value", "24", "entries", "64",
        ])
        .args(["name", LEGACY_CONNTRACK_V4])
        .status()
        .expect("bpftool");
    assert!(created.success());
    match Dataplane::load(options(&pins)) {
        Err(e) => {
            let text = format!("{:#}", anyhow::Error::from(e));
            assert!(
                text.contains(LEGACY_CONNTRACK_V4) && text.contains("(20, 24)"),
                "{text}"
            );
        }
        Ok(_) => panic!("a conntrack pin with 20-byte keys was read as IPv4 flows"),
    }
    assert!(path.exists(), "the refused pin was removed");
}
