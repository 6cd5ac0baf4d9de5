//! A private copy of the real load-balancer program with VIPs and backends, driven through the
//! agent's own `Dataplane`, table slots and encoding functions, and a way to run frames through
//! it.

use std::{cell::RefCell, collections::HashMap, net::IpAddr, process::Command, time::Duration};

use vip_agent::{
    apply::{
        Sources, TableSlots,
        encode::{backend_entry, datapath_keys, egress_key, egress_meta, hash_port_mask, vip_meta},
    },
    config::{EgressConfig, Encapsulation, HashFields, Protocol, VipConfig},
    dataplane::{Dataplane, DataplaneOptions, DecapPlane, test_run},
    net::nexthop::NextHop,
};
use vip_common::{
    Backend, BackendId, FlowKey, IPPROTO_TCP, VipKey,
    hash::flow_hash,
    maglev::{MaglevBackend, MaglevTable},
};

use crate::packet::LB_MAC;

/// The LB node's own addresses (outer source of encapsulated packets).
pub const LB_SRC4: &str = "198.18.0.2";
pub const LB_SRC6: &str = "fd00:18::2";
/// MAC of the gateway toward the backends, as the agent would have resolved it.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// ifindex that test runs see as ingress (loopback of the running network namespace).
pub const TEST_RUN_IFINDEX: u32 = 1;
/// Small default so each test loads fast; tests of balance use the real default size.
pub const SMALL_TABLE: u32 = 251;

/// Maglev table slots of a test load (VIPs plus spares).
pub const TABLE_SLOTS: u32 = 16;

/// XDP action numbers.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The LB node's outer sources.
fn lb_sources() -> Sources {
    Sources {
        v4: Some(LB_SRC4.parse().unwrap()),
        v6: Some(LB_SRC6.parse().unwrap()),
    }
}

/// A VIP as tests configure it: the config's settings, with backends named by id.
#[derive(Clone, Debug)]
pub struct VipSpec {
    pub addr: IpAddr,
    pub proto: u8,
    pub port: u16,
    pub hash: HashFields,
    pub udp_idle_timeout: Duration,
    /// Outer sources spread over this prefix.
    pub source_prefix: Option<ipnet::IpNet>,
    /// GUE to this port instead of IP-in-IP.
    pub gue_port: Option<u16>,
    /// Use this `vip_id` (as an agent reusing a freed one would) instead of the next.
    pub vip_id: Option<u32>,
    pub backends: Vec<(BackendId, u32)>,
}

impl VipSpec {
    pub fn new(addr: &str, proto: u8, port: u16, backends: &[BackendId]) -> Self {
        Self {
            addr: addr.parse().expect("address"),
            proto,
            port,
            hash: HashFields::FiveTuple,
            udp_idle_timeout: Duration::from_secs(30),
            source_prefix: None,
            gue_port: None,
            vip_id: None,
            backends: backends.iter().map(|&id| (id, 1)).collect(),
        }
    }

    pub fn key(&self) -> VipKey {
        VipKey::new(self.addr, self.proto, self.port)
    }

    /// The VIP as the agent's config would hold it (without backends: the fixture names them by
    /// id).
    pub fn config(&self) -> VipConfig {
        VipConfig {
            address: self.addr,
            protocol: if self.proto == IPPROTO_TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            port: self.port,
            encapsulation: if self.gue_port.is_some() {
                Encapsulation::Gue
            } else {
                Encapsulation::Ipip
            },
            gue_port: self.gue_port.unwrap_or(0),
            source_prefix: self.source_prefix,
            hash: self.hash,
            udp_idle_timeout: self.udp_idle_timeout,
            backends: Vec::new(),
            communities: Vec::new(),
            large_communities: Vec::new(),
            med: None,
        }
    }
}

/// A VIP and its weighted backend set.
type TableCacheKey = (VipKey, Vec<(BackendId, u32)>);

/// One loaded copy of the program with its configuration.
pub struct Lb {
    pub dataplane: Dataplane,
    pub tables: TableSlots,
    pub backends: Vec<(BackendId, IpAddr)>,
    next_vip_id: u32,
    /// Tables by VIP and backend set: tests predict thousands of flows against the same table.
    table_cache: RefCell<HashMap<TableCacheKey, MaglevTable>>,
}

impl Lb {
    pub fn new() -> Self {
        Self::with_table_size(SMALL_TABLE)
    }

    pub fn with_table_size(table_size: u32) -> Self {
        Self::with_sizes(table_size, 65_536)
    }

    /// A copy with `conntrack_entries` of connection tracking.
    pub fn with_sizes(table_size: u32, conntrack_entries: u32) -> Self {
        Self::with_options(DataplaneOptions {
            table_size,
            table_slots: TABLE_SLOTS,
            conntrack_entries,
            ..DataplaneOptions::default()
        })
    }

    /// A copy loaded with `options` (never pinned).
    pub fn with_options(options: DataplaneOptions) -> Self {
        Self::from_object(vip_agent::dataplane::object::load_balancer(), options)
    }

    /// A copy of another build of the load balancer (an object file's bytes), for comparisons.
    pub fn from_object(object: &[u8], options: DataplaneOptions) -> Self {
        crate::require_root();
        let slots = options.table_slots;
        let mut dataplane = Dataplane::load_object(
            object,
            DataplaneOptions {
                pin_dir: None,
                ..options
            },
        )
        .expect("load the vip-ebpf object");
        dataplane.program().expect("the verifier accepts vip_lb");
        Self {
            dataplane,
            tables: TableSlots::new(slots),
            backends: Vec::new(),
            next_vip_id: 0,
            table_cache: RefCell::default(),
        }
    }

    /// Adds backend `id` with a resolved next hop on the test-run ingress interface (XDP_TX).
    pub fn backend(&mut self, id: BackendId, addr: &str) -> &mut Self {
        self.backend_via(id, addr, Some(TEST_RUN_IFINDEX))
    }

    /// Adds backend `id`, with a resolved next hop through `ifindex`, or none (FIB lookup).
    pub fn backend_via(&mut self, id: BackendId, addr: &str, ifindex: Option<u32>) -> &mut Self {
        let ip: IpAddr = addr.parse().expect("address");
        let hop = ifindex.map(|ifindex| NextHop {
            ifindex,
            src_mac: LB_MAC,
            dst_mac: GATEWAY_MAC,
        });
        // Fixture backends belong to no VIP in particular: their tag is their address's.
        let no_vip: VipKey = bytemuck::Zeroable::zeroed();
        let backend = backend_entry(&no_vip, ip, 0, true, hop.as_ref());
        self.dataplane
            .set_backend(id, &backend)
            .expect("write backend");
        self.backends.retain(|(b, _)| *b != id);
        self.backends.push((id, ip));
        self
    }

    /// Empties a backend slot, as the agent does when a backend is removed.
    pub fn remove_backend(&mut self, id: BackendId) {
        let empty: Backend = bytemuck::Zeroable::zeroed();
        self.dataplane
            .set_backend(id, &empty)
            .expect("clear backend");
    }

    pub fn backend_addr(&self, id: BackendId) -> IpAddr {
        self.backends
            .iter()
            .find(|(b, _)| *b == id)
            .expect("known backend")
            .1
    }

    /// The Maglev table for a VIP's backends.
    pub fn table(&self, spec: &VipSpec) -> MaglevTable {
        let cache_key = (spec.key(), spec.backends.clone());
        if let Some(table) = self.table_cache.borrow().get(&cache_key) {
            return table.clone();
        }
        let members: Vec<MaglevBackend> = spec
            .backends
            .iter()
            .map(|&(id, weight)| MaglevBackend {
                addr: self.backend_addr(id),
                weight,
                id,
            })
            .collect();
        let table =
            MaglevTable::build(self.dataplane.options().table_size, &members).expect("valid table");
        self.table_cache
            .borrow_mut()
            .insert(cache_key, table.clone());
        table
    }

    /// The backend and flow hash that userspace Maglev predicts for a flow to `spec`.
    pub fn predict(&self, spec: &VipSpec, flow: &FlowKey) -> (BackendId, u32) {
        let hash = flow_hash(flow, hash_port_mask(spec.hash));
        (self.table(spec).lookup(hash), hash)
    }

    /// Publishes a VIP (or switches it to a new table); returns its `vip_id`.
    pub fn vip(&mut self, spec: &VipSpec) -> u32 {
        let vip_id = spec.vip_id.unwrap_or(self.next_vip_id);
        self.next_vip_id = self.next_vip_id.max(vip_id + 1);
        let sources = lb_sources();
        let table = self.table(spec);
        let slot = self.tables.take().expect("a free table slot");
        let meta = vip_meta(&spec.config(), sources, vip_id, slot);
        self.dataplane
            .write_table(slot, table.slots())
            .expect("write table");
        self.dataplane
            .set_vip(&spec.key(), &meta)
            .expect("publish VIP");
        self.tables.make_live(spec.key(), slot);
        vip_id
    }

    /// Makes `vip` an egress address as the agent does: ports `first..=last` in blocks of
    /// `block_size`, block `b` owned by backend `id` for each `(b, id)` of `owners`, replies
    /// encapsulated as `template`'s packets are. Returns its `vip_id`.
    pub fn egress(
        &mut self,
        template: &VipSpec,
        (first, last, block_size): (u16, u16, u16),
        owners: &[(u16, BackendId)],
    ) -> u32 {
        let vip_id = self.next_vip_id;
        self.next_vip_id += 1;
        let config = EgressConfig {
            vip: template.addr,
            first_port: first,
            last_port: last,
            block_size,
            rest: Duration::ZERO,
            backends: Vec::new(),
        };
        let mut table = vec![vip_common::NO_BACKEND; self.dataplane.options().table_size as usize];
        for (block, id) in owners {
            table[usize::from(*block)] = *id;
        }
        let slot = self.tables.take().expect("a free table slot");
        self.dataplane
            .write_table(slot, &table)
            .expect("write owners");
        let meta = egress_meta(&template.config(), &config, lb_sources(), vip_id, slot);
        let key = egress_key(template.addr);
        for key in datapath_keys(&key) {
            self.dataplane.set_vip(&key, &meta).expect("publish egress");
        }
        self.tables.make_live(key, slot);
        vip_id
    }

    /// Removes an egress address's entries, as the agent does.
    pub fn remove_egress(&mut self, addr: IpAddr) {
        let key = egress_key(addr);
        for key in datapath_keys(&key) {
            self.dataplane.remove_vip(&key).expect("remove egress");
        }
        self.tables.release(&key);
    }

    /// Removes a VIP, as the agent does.
    pub fn remove_vip(&mut self, key: &VipKey) {
        self.dataplane.remove_vip(key).expect("remove VIP");
        self.tables.release(key);
    }

    /// Runs one frame through the program: (action, output frame).
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_program(&mut self.dataplane, frame, None)
    }

    /// Runs one frame as if received on `ifindex`.
    pub fn run_on(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        run_program(&mut self.dataplane, frame, Some(ifindex))
    }
}

impl Default for Lb {
    fn default() -> Self {
        Self::new()
    }
}

/// A private copy of the backends' decapsulation program.
pub struct Decap {
    pub plane: DecapPlane,
}

impl Decap {
    /// Accepts outer destinations `local` and inner destinations `vips`.
    pub fn new(local: &[&str], vips: &[&str]) -> Self {
        crate::require_root();
        let mut plane = DecapPlane::load(None).expect("load the vip-decap object");
        plane.program().expect("the verifier accepts vip_decap");
        let parse = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };
        plane
            .set_local_addresses(&parse(local))
            .expect("local addresses");
        plane.set_vips(&parse(vips)).expect("VIPs");
        Self { plane }
    }

    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_xdp(self.plane.program().expect("program"), frame, None)
    }
}

/// Runs one frame through a dataplane's program (one the agent's `Balancer` fills, say).
pub fn run_dataplane(dataplane: &mut Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    run_program(dataplane, frame, None)
}

fn run_program(dataplane: &mut Dataplane, frame: &[u8], ifindex: Option<u32>) -> (u32, Vec<u8>) {
    run_xdp(dataplane.program().expect("program loaded"), frame, ifindex)
}

fn run_xdp(prog: &mut aya::programs::Xdp, frame: &[u8], ifindex: Option<u32>) -> (u32, Vec<u8>) {
    let outcome = test_run::run_xdp(prog, frame, ifindex, 1).expect("BPF_PROG_TEST_RUN");
    (outcome.action, outcome.frame)
}

/// Moves the calling thread (one test) into a fresh network namespace with `lo` up. It vanishes
/// with the thread, so nothing is left behind even when the test fails. Child processes (`ip`)
/// started from this thread run inside it.
pub fn private_netns() {
    // SAFETY: unshare affects only the calling thread's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    ip(&["link", "set", "lo", "up"]);
}

/// Runs `ip ARGS` in the calling thread's namespace, panicking with its output on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
