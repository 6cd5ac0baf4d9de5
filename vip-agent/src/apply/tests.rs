//! Plans stepped through config changes on the host, against an image of the maps.

use std::{convert::Infallible, path::Path};

use vip_common::{BACKEND_F_PRESENT, NO_BACKEND};

use super::*;
use crate::config::{self, Config};

/// The maps' contents, as the datapath would see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MapImage {
    vips: HashMap<VipKey, VipMeta>,
    backends: HashMap<BackendId, Backend>,
    tables: HashMap<u32, Vec<BackendId>>,
    insert_limit: Option<u32>,
    writes: usize,
}

impl MapWriter for MapImage {
    type Error = Infallible;
    fn set_insert_limit(&mut self, per_second: u32) -> Result<(), Infallible> {
        self.insert_limit = Some(per_second);
        self.writes += 1;
        Ok(())
    }
    fn set_backend(&mut self, id: BackendId, entry: &Backend) -> Result<(), Infallible> {
        self.backends.insert(id, *entry);
        self.writes += 1;
        Ok(())
    }
    fn release_backend(&mut self, id: BackendId) -> Result<TrafficCounters, Infallible> {
        self.backends.remove(&id);
        self.writes += 1;
        Ok(TrafficCounters::default())
    }
    fn write_table(&mut self, slot: u32, table: &[BackendId]) -> Result<(), Infallible> {
        self.tables.insert(slot, table.to_vec());
        self.writes += 1;
        Ok(())
    }
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), Infallible> {
        self.vips.insert(*key, *meta);
        self.writes += 1;
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), Infallible> {
        self.vips.remove(key);
        self.writes += 1;
        Ok(())
    }
}

impl MapImage {
    /// Every VIP's live table names only present backends of that VIP.
    fn check_consistent(&self) {
        for (key, meta) in &self.vips {
            let table = &self.tables[&meta.table];
            for id in table.iter().filter(|&&id| id != NO_BACKEND) {
                let b = self
                    .backends
                    .get(id)
                    .unwrap_or_else(|| panic!("{key:?}: table names empty id {id}"));
                assert_ne!(b.flags & BACKEND_F_PRESENT, 0);
                assert_eq!(b.vip_id, meta.vip_id);
            }
        }
        // An egress address's entries (one per protocol) share its table.
        let mut units: Vec<(u32, u32)> = self.vips.values().map(|m| (m.vip_id, m.table)).collect();
        units.sort();
        units.dedup();
        let live: Vec<u32> = units.iter().map(|(_, table)| *table).collect();
        let mut unique = live.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(live.len(), unique.len(), "two VIPs share a table slot");
    }
}

/// A config of `vips` VIPs on `port`, each with `backends` backends numbered from `first`, in
/// 16 table slots and 32 backend ids.
fn config(vips: usize, port: u16, backends: usize, first: usize) -> Config {
    config_with(vips, port, backends, first, 32)
}

fn config_with(vips: usize, port: u16, backends: usize, first: usize, max_backends: u32) -> Config {
    let mut text = format!(
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"192.0.2.10\"\ntable_size = 251\n\
         table_slots = 16\nmax_backends = {max_backends}\n"
    );
    for v in 0..vips {
        text += &format!(
            "[[vip]]\naddress = \"198.51.100.{}\"\nprotocol = \"tcp\"\nport = {port}\n",
            v + 1
        );
        for b in 0..backends {
            text += &format!(
                "[[vip.backend]]\naddress = \"192.0.2.{}\"\n",
                first + v * backends + b
            );
        }
    }
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

fn target(cfg: &Config) -> Target {
    Target::configured(cfg)
}

fn applied(cfg: &Config) -> Applied {
    Applied::new(Capacity {
        table_size: cfg.node.table_size,
        table_slots: cfg.node.table_slots,
        vips: cfg.node.max_vips,
        backends: cfg.node.max_backends,
    })
}

fn no_hops() -> HashMap<IpAddr, NextHop> {
    HashMap::new()
}

fn ports(image: &MapImage) -> Vec<u16> {
    let mut p: Vec<u16> = image
        .vips
        .keys()
        .map(|k| u16::from_be_bytes(k.port))
        .collect();
    p.sort();
    p.dedup();
    p
}

/// 15 VIPs in 16 table slots, then every VIP's port changes: what leaves is removed before
/// what comes is added, so the change fits.
#[test]
fn changing_every_vips_port_fits_in_one_spare_slot() {
    let old = config(15, 80, 2, 1);
    let new = config(15, 81, 2, 1);
    let mut applied = applied(&old);
    let mut image = MapImage::default();
    applied
        .apply(&target(&old), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    assert_eq!(image.vips.len(), 15);
    let report = applied
        .apply(&target(&new), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    assert_eq!(image.vips.len(), 15);
    assert_eq!(ports(&image), [81]);
    assert_eq!(report.vips_removed, 15);
    assert_eq!(report.vips_published, 15);
}

/// 15 VIPs of 2 backends in 32 backend ids, then every backend replaced: a VIP's old backends
/// are released right after its new table is live, so the peak is 32.
#[test]
fn replacing_every_backend_fits_at_the_peak() {
    let old = config(15, 80, 2, 1);
    let new = config(15, 80, 2, 101);
    let mut applied = applied(&old);
    let mut image = MapImage::default();
    applied
        .apply(&target(&old), &no_hops(), &mut image)
        .unwrap();
    applied
        .apply(&target(&new), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    let mut addrs: Vec<IpAddr> = image
        .backends
        .values()
        .filter_map(|b| vip_common::addr_from_bytes(&b.addr, b.family))
        .collect();
    addrs.sort();
    assert_eq!(addrs.len(), 30);
    assert!(
        addrs.iter().all(|a| a.to_string().starts_with("192.0.2.1")),
        "{addrs:?}"
    );
}

/// A change that cannot fit at its peak is refused before anything is written, and the
/// applied state stays what it was: applying the old target again writes nothing.
#[test]
fn a_change_that_does_not_fit_writes_nothing() {
    // Either config alone fits in 31 ids; replacing every backend needs 32 at the peak.
    let old = config_with(15, 80, 2, 1, 31);
    let new = config_with(15, 80, 2, 101, 31);
    let mut applied = applied(&old);
    let mut image = MapImage::default();
    applied
        .apply(&target(&old), &no_hops(), &mut image)
        .unwrap();
    let before = image.clone();
    let err = applied
        .apply(&target(&new), &no_hops(), &mut image)
        .unwrap_err();
    assert!(
        matches!(err, ApplyError::Plan(PlanError::BackendIdsExhausted(31))),
        "{err}"
    );
    assert_eq!(image, before);
    applied
        .apply(&target(&old), &no_hops(), &mut image)
        .unwrap();
    assert_eq!(
        image, before,
        "nothing to write: the applied state is the old one"
    );
}

/// A restart over pinned state plans like a reload: the adopted VIPs that the new config
/// lacks leave first.
#[test]
fn a_restart_over_pinned_state_removes_before_it_adds() {
    let old = config(15, 80, 2, 1);
    let new = config(15, 82, 2, 1);
    let mut first = applied(&old);
    let mut image = MapImage::default();
    first.apply(&target(&old), &no_hops(), &mut image).unwrap();
    let vips: Vec<(VipKey, VipMeta)> = image.vips.iter().map(|(k, m)| (*k, *m)).collect();
    let backends: Vec<(BackendId, Backend)> =
        image.backends.iter().map(|(i, b)| (*i, *b)).collect();
    let mut restarted = applied(&new);
    assert_eq!(restarted.adopt(&vips, &backends), 45);
    restarted
        .apply(&target(&new), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    assert_eq!(ports(&image), [82]);
    assert_eq!(image.vips.len(), 15);
}

/// Steps through a VIP's life: the map contents after each step are exactly what they
/// should be, and a step that changes nothing writes nothing.
#[test]
fn map_contents_follow_config_steps() {
    let one = config(1, 80, 3, 1);
    let mut applied = applied(&one);
    let mut image = MapImage::default();
    applied
        .apply(&target(&one), &no_hops(), &mut image)
        .unwrap();
    assert_eq!(image.backends.len(), 3);
    assert_eq!(image.insert_limit, Some(one.node.conntrack_insert_limit));
    let writes = image.writes;
    applied
        .apply(&target(&one), &no_hops(), &mut image)
        .unwrap();
    assert_eq!(image.writes, writes, "an unchanged target writes nothing");

    // A backend goes down: the table leaves it out, its entry stays but is not present.
    let mut down = target(&one);
    down.vips[0].backends[1].present = false;
    down.vips[0].backends[1].weight = 0;
    applied.apply(&down, &no_hops(), &mut image).unwrap();
    image.check_consistent();
    let id = applied
        .backend_id(&(one.vips[0].key(), one.vips[0].backends[1].address))
        .unwrap();
    assert_eq!(image.backends[&id].flags & BACKEND_F_PRESENT, 0);
    let meta = image.vips.values().next().unwrap();
    assert!(!image.tables[&meta.table].contains(&id));
    assert!(applied.forwardable(&one.vips[0].key()));

    // Every backend out of the table: the VIP stays in the maps but is not forwardable.
    let mut drained = target(&one);
    for b in &mut drained.vips[0].backends {
        b.weight = 0;
    }
    applied.apply(&drained, &no_hops(), &mut image).unwrap();
    assert!(!applied.forwardable(&one.vips[0].key()));

    // The VIP leaves: nothing of it remains.
    let empty = config(0, 80, 0, 1);
    applied
        .apply(&target(&empty), &no_hops(), &mut image)
        .unwrap();
    assert!(image.vips.is_empty() && image.backends.is_empty());
    assert!(applied.accounts().is_empty());
}

/// A VIP with an egress section of two backends (blocks 0 and 2 of 4).
fn egress_config(owners: &[(u8, u16)]) -> Config {
    let mut text =
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"192.0.2.10\"\ntable_size = 251\n\
         [[vip]]\naddress = \"198.51.100.1\"\nprotocol = \"tcp\"\nport = 80\n\
         [[vip.backend]]\naddress = \"192.0.2.1\"\n\
         [[egress]]\nvip = \"198.51.100.1\"\nports = \"40000-40399\"\nblock_size = 100\n"
            .to_string();
    for (host, block) in owners {
        text += &format!("[[egress.backend]]\naddress = \"192.0.2.{host}\"\nblock = {block}\n");
    }
    config::parse(Path::new("test.toml"), &text).expect("valid config")
}

#[test]
fn an_egress_address_is_an_owner_table_under_one_entry_per_protocol() {
    let cfg = egress_config(&[(11, 0), (12, 2)]);
    let mut applied = applied(&cfg);
    let mut image = MapImage::default();
    applied
        .apply(&target(&cfg), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    let egress: Vec<(&VipKey, &VipMeta)> = image
        .vips
        .iter()
        .filter(|(_, m)| m.egress_block_size != 0)
        .collect();
    let mut protocols: Vec<u8> = egress.iter().map(|(k, _)| k.proto).collect();
    protocols.sort();
    assert_eq!(protocols, [1, 6, 17], "ICMP, TCP and UDP");
    let meta = egress[0].1;
    assert!(
        egress
            .iter()
            .all(|(k, m)| k.port == [0; 2] && m.table == meta.table)
    );
    assert_eq!((meta.egress_first, meta.egress_span), (40_000, 399));
    let table = &image.tables[&meta.table];
    let owner = |host: u8| {
        let addr: IpAddr = format!("192.0.2.{host}").parse().unwrap();
        applied.backend_id(&(encode::egress_key("198.51.100.1".parse().unwrap()), addr))
    };
    assert_eq!(Some(table[0]), owner(11));
    assert_eq!(table[1], NO_BACKEND);
    assert_eq!(Some(table[2]), owner(12));
    assert!(table[3..].iter().all(|&id| id == NO_BACKEND));
    assert_eq!(meta.egress_block(40_250), Some(2));

    // The section goes: its three entries and its owners go with it; the VIP stays.
    let without = config(1, 80, 1, 1);
    applied
        .apply(&target(&without), &no_hops(), &mut image)
        .unwrap();
    image.check_consistent();
    assert!(image.vips.values().all(|m| m.egress_block_size == 0));
    assert_eq!(image.vips.len(), 1);
}

#[test]
fn a_resting_block_has_no_owner_in_the_table() {
    let cfg = egress_config(&[(11, 0), (12, 2)]);
    let mut applied = applied(&cfg);
    let mut image = MapImage::default();
    let resting = Target::new(
        &cfg,
        |_, b| BackendTarget {
            address: b.address,
            weight: b.table_weight(),
            present: true,
        },
        |_, block| block == 2,
    );
    applied.apply(&resting, &no_hops(), &mut image).unwrap();
    let meta = image
        .vips
        .values()
        .find(|m| m.egress_block_size != 0)
        .unwrap();
    let table = &image.tables[&meta.table];
    assert_ne!(table[0], NO_BACKEND);
    assert_eq!(table[2], NO_BACKEND, "block 2 rests");
    // The rest ends: the owner gets its block, in a freshly written table.
    applied
        .apply(&target(&cfg), &no_hops(), &mut image)
        .unwrap();
    let meta = image
        .vips
        .values()
        .find(|m| m.egress_block_size != 0)
        .unwrap();
    assert_ne!(image.tables[&meta.table][2], NO_BACKEND);
}
