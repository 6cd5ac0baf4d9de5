//! Benchmark harness for `cargo xtask bench`; never loaded by the agent.
//!
//! `bench_restore` puts the case's input frame back (BPF_PROG_TEST_RUN with `repeat` would
//! otherwise feed the program its own encapsulated output) and tail-calls the program under
//! test. `bench_floor_tx` is the trivial XDP_TX program: the floor, and, behind the same wrapper,
//! the wrapper's own cost to subtract. `bench_sink` drops what reaches the far end of a veth that
//! live frames leave by.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ProgramArray},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use vip_common::bench::{BENCH_FRAME_MAX, BenchFrame};
// The shared panic handler.
use vip_ebpf as _;

#[btf_map]
static BENCH_FRAME: Array<BenchFrame, 1> = Array::new();

#[btf_map]
static BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

#[xdp]
pub(crate) fn bench_restore(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: map value pointer, valid for this run.
    let frame = unsafe { &mut *frame };
    let want = frame.len as usize;
    if want == 0 || want > BENCH_FRAME_MAX {
        return xdp_action::XDP_ABORTED;
    }
    let have = ctx.data_end() - ctx.data();
    // Also keeps the subtraction 64-bit: with ALU32, LLVM would otherwise narrow it to a
    // 32-bit subtraction of packet pointers, which the verifier refuses.
    if have > u16::MAX as usize {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: helper calls on our own context and a map value of BENCH_FRAME_MAX bytes; the
    // length passed is bounded to 1..=BENCH_FRAME_MAX for the verifier.
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, have as i32 - want as i32) != 0 {
            return xdp_action::XDP_ABORTED;
        }
        let len = ((want - 1) & (BENCH_FRAME_MAX - 1)) + 1;
        if bpf_xdp_store_bytes(ctx.ctx, 0, frame.bytes.as_mut_ptr().cast(), len as u32) != 0 {
            return xdp_action::XDP_ABORTED;
        }
        if frame.new_flow_at != 0 {
            frame.seq = frame.seq.wrapping_add(1);
            let mut source = frame.seq.to_be_bytes();
            let at = frame.new_flow_at & (BENCH_FRAME_MAX as u32 - 1);
            if bpf_xdp_store_bytes(ctx.ctx, at, source.as_mut_ptr().cast(), 4) != 0 {
                return xdp_action::XDP_ABORTED;
            }
        }
        BENCH_TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

#[xdp]
pub(crate) fn bench_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp]
pub(crate) fn bench_sink(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
