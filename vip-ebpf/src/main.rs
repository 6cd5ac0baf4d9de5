//! vip's XDP load balancer.
//!
//! Every packet on the LB node's NIC comes through [`vip_lb`]. Packets to a VIP get a backend
//! (from connection tracking, else the VIP's Maglev table), are encapsulated toward it and leave
//! with XDP_TX or a redirect; everything else passes untouched. The agent decides everything it
//! can ahead of time (outer source, next hop, table contents); this program only applies it.
#![no_std]
#![no_main]

mod conntrack;
mod encap;
mod hc;
mod log;
mod maps;
mod parse;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{maps::STATS, parse::Verdict};

#[xdp]
pub(crate) fn vip_lb(ctx: XdpContext) -> u32 {
    // SAFETY: index 0 of a one-entry per-CPU array always exists; this CPU's copy is ours until
    // the program returns (XDP runs with preemption disabled).
    let Some(stats) = STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p }) else {
        return xdp_action::XDP_PASS;
    };
    let verdict = parse::process(&ctx, stats);
    // The one place where what happened becomes an action and a counter.
    let action = match verdict {
        Verdict::Pass => {
            stats.passed += 1;
            xdp_action::XDP_PASS
        }
        Verdict::Tx => {
            stats.tx += 1;
            xdp_action::XDP_TX
        }
        Verdict::Redirect(action) => {
            stats.redirected += 1;
            action
        }
        Verdict::NoNeighbourPass => {
            stats.no_neighbour_passed += 1;
            xdp_action::XDP_PASS
        }
        Verdict::NoRoutePass => {
            stats.no_route_passed += 1;
            xdp_action::XDP_PASS
        }
        Verdict::DropFragment => {
            stats.drop_fragment += 1;
            xdp_action::XDP_DROP
        }
        Verdict::DropIpOptions => {
            stats.drop_ip_options += 1;
            xdp_action::XDP_DROP
        }
        Verdict::DropMalformed => {
            stats.drop_malformed += 1;
            xdp_action::XDP_DROP
        }
        Verdict::DropNoBackend => {
            stats.drop_no_backend += 1;
            xdp_action::XDP_DROP
        }
        Verdict::DropNoHeadroom => {
            stats.drop_no_headroom += 1;
            xdp_action::XDP_DROP
        }
    };
    log::hand_over(&ctx, &verdict, action);
    action
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
