//! vip's XDP load balancer.
//!
//! Every packet on the LB node's NIC comes through [`vip_lb`], and [`process`] reads as the
//! pipeline: `parse` → `select` (conntrack, Maglev, egress owners) → `encap` → `nexthop`. Packets to a VIP get a backend
//! (from connection tracking, else the VIP's Maglev table), are encapsulated toward it and leave
//! with XDP_TX or a redirect; everything else passes untouched. The agent decides everything it
//! can ahead of time (outer source, next hop, table contents); this program only applies it.
#![no_std]
#![no_main]

mod client;
mod conntrack;
mod encap;
mod hc;
mod log;
mod maps;
mod nexthop;
mod parse;
mod replay;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use vip_common::{BackendId, DatapathStats, Outcome, VipMeta};

use crate::{
    maps::STATS,
    parse::Candidate,
    select::{Choice, ConnPolicy, Established, Recording},
};

// Inlined into the entry point the macro wraps it in: LLVM stopped doing so on its own once the
// program grew, and a BPF-to-BPF call cost every packet about 7 ns (`vip-bench --compare`).
#[xdp]
#[inline(always)]
pub(crate) fn vip_lb(ctx: XdpContext) -> u32 {
    // SAFETY: index 0 of a one-entry per-CPU array always exists; this CPU's copy is ours until
    // the program returns (XDP runs with preemption disabled).
    let Some(stats) = STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p }) else {
        return xdp_action::XDP_PASS;
    };
    let outcome = process(&ctx, stats);
    // The one place where what happened becomes a counter and an action.
    stats.count(outcome);
    let action = outcome.xdp_action();
    log::hand_over(&ctx, outcome, action);
    action
}

/// One packet, top to bottom: parse it, find its flow's backend (conntrack first, then the
/// VIP's Maglev table), count it, encapsulate it, and send it toward the next hop; or, for an
/// established flow whose recorded headers still hold, send it with those. Everything happens
/// at this one call site, so the program holds one inlined copy of each step (and of its
/// stack).
#[inline(always)]
fn process(ctx: &XdpContext, stats: &mut DatapathStats) -> Outcome {
    let packet = match parse::classify(ctx) {
        Ok(packet) => packet,
        Err(outcome) => return outcome,
    };
    // An established flow's entry names its VIP and backend: no lookup by key, no hashing.
    let (meta, choice, recording) =
        match select::established(&packet.flow, packet.policy, packet.l2_len) {
            Some(_) if packet.malformed => return Outcome::DropMalformed,
            Some(Established::Replay(replay, backend)) => {
                stats.conntrack_hit += 1;
                count_forwarded(stats, &packet, backend);
                return replay.send(ctx, packet.inner);
            }
            Some(Established::Resolved(meta, choice, recording)) => {
                stats.conntrack_hit += 1;
                (meta, choice, Some(recording))
            }
            None => match new_flow(&packet, stats) {
                Ok((meta, choice)) => (meta, choice, None),
                Err(outcome) => return outcome,
            },
        };
    count_forwarded(stats, &packet, choice.id);
    let Some(hop) = encap::encapsulate(ctx, packet.l2_len, meta, &choice, packet.inner) else {
        return Outcome::DropNoHeadroom;
    };
    if let Some(Recording { replay, generation }) = recording {
        replay.record(ctx, generation, packet.l2_len, (meta, &choice, &hop));
    }
    nexthop::leave(ctx, &hop)
}

/// A packet no conntrack entry decides: its VIP (found by key) and the backend the VIP's table
/// or egress owners give it; `Err`: what becomes of it instead.
#[inline(always)]
fn new_flow(
    packet: &Candidate,
    stats: &mut DatapathStats,
) -> Result<(&'static VipMeta, Choice), Outcome> {
    let meta = packet
        .meta
        .or_else(|| parse::find_vip(&packet.flow))
        .ok_or(Outcome::Passed)?;
    if packet.malformed {
        return Err(Outcome::DropMalformed);
    }
    // The one test a packet to a served port pays for egress: its VIP entry is not an egress
    // entry (those have all-ports keys of their own).
    let choice = if meta.egress_block_size != 0 || packet.policy == ConnPolicy::EgressOnly {
        select::egress(meta, &packet.flow)?
    } else {
        select::backend(meta, &packet.flow, packet.policy, stats).ok_or(Outcome::DropNoBackend)?
    };
    Ok((meta, choice))
}

/// Counts a packet that goes to `backend`: its traffic, and ICMP "too big" errors.
#[inline(always)]
fn count_forwarded(stats: &mut DatapathStats, packet: &Candidate, backend: BackendId) {
    if packet.policy == ConnPolicy::LookupOnly {
        stats.icmp_too_big += 1;
    }
    select::count_traffic(backend, packet.inner.len);
}

/// Health checks through the data path (see `hc`): tc egress of `lo`.
#[classifier]
pub(crate) fn vip_hc(ctx: TcContext) -> i32 {
    hc::encapsulate(&ctx)
}

/// Datapath debug logs (see `log`): tail-called by `vip_lb` when logs are on.
#[xdp]
pub(crate) fn vip_lb_log(ctx: XdpContext) -> u32 {
    log::record(&ctx)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
