//! Pinned maps: the layout table matches the loaded object, a second load reuses the pinned
//! state (and fills its own, unpinned `TX_PORTS` from the pinned backends), a pinned map of the
//! wrong shape is refused, and bpftool decodes maps through BTF.

use std::{path::PathBuf, process::Command};

use aya::maps::MapInfo;
use vip_agent::dataplane::{Dataplane, DataplaneError, DataplaneOptions};
use vip_common::{
    BACKEND_F_NEXTHOP, BACKEND_F_PRESENT, Backend, IPPROTO_TCP, VipKey, layout::LAYOUT,
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
            "CONNTRACK" | "CONNTRACK_V4" => opts.conntrack_entries,
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
            assert!(
                text.contains("CONNTRACK") && text.contains("8192"),
                "{text}"
            );
        }
        Err(other) => panic!("expected a pinned-map mismatch, got {other}"),
        Ok(_) => panic!("a pinned map of another size was accepted"),
    }
    assert!(pins.0.join("CONNTRACK").exists());
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
