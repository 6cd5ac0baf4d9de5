//! The timing harness: the datapath under test runs behind the harness object's
//! input-restoring wrapper (`bench_restore`), which copies the input frame back before every
//! iteration and tail-calls the program in its program array; the trivial XDP_TX program
//! (`bench_floor`) is timed the same way and subtracted.

use std::time::Duration;

use aya::{
    EbpfLoader,
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, Xdp},
};
use vip_agent::dataplane::test_run;
use vip_common::bench::{
    BENCH_FLOOR_PROGRAM, BENCH_FRAME, BENCH_FRAME_MAX, BENCH_RESTORE_PROGRAM, BENCH_TARGET,
    BenchFrame,
};
use vip_tests::{fixture::*, packet::*};

/// Iterations per timed run, and timed runs per case (the median is reported).
pub(crate) const REPEAT: u32 = 200_000;
pub(crate) const RUNS: usize = 15;
const ETH_HLEN: usize = 14;

/// The loaded harness and the maps it reads.
pub(crate) struct Harness {
    ebpf: aya::Ebpf,
    targets: ProgramArray<MapData>,
    frames: Array<MapData, BenchFrame>,
    floor_fd: ProgramFd,
    /// The trivial program's time behind the wrapper, subtracted from every result (measured
    /// by the datapath report).
    pub(crate) wrapped_floor: f64,
}

impl Harness {
    pub(crate) fn load() -> Self {
        let mut ebpf = EbpfLoader::new()
            .load(vip_agent::dataplane::object::bench_harness())
            .expect("load the harness object");
        for name in [BENCH_RESTORE_PROGRAM, BENCH_FLOOR_PROGRAM] {
            let p: &mut Xdp = ebpf.program_mut(name).expect(name).try_into().expect("XDP");
            p.load().expect("verifier accepts the harness");
        }
        let floor_fd = {
            let p: &Xdp = ebpf
                .program(BENCH_FLOOR_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            p.fd().unwrap().try_clone().unwrap()
        };
        let targets = ProgramArray::try_from(ebpf.take_map(BENCH_TARGET).unwrap()).unwrap();
        let frames = Array::try_from(ebpf.take_map(BENCH_FRAME).unwrap()).unwrap();
        Self {
            ebpf,
            targets,
            frames,
            floor_fd,
            wrapped_floor: 0.0,
        }
    }

    fn wrapper(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(BENCH_RESTORE_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// One timed run of `repeat` iterations of `frame` through `target` behind the wrapper:
    /// raw ns per iteration, the action and the output.
    pub(crate) fn time(
        &mut self,
        target: &ProgramFd,
        frame: &[u8],
        repeat: u32,
    ) -> (f64, u32, Vec<u8>) {
        self.frames
            .set(0, bench_frame(frame), 0)
            .expect("write BENCH_FRAME");
        self.targets.set(0, target, 0).unwrap();
        timed(self.wrapper(), frame, repeat)
    }

    /// As [`Self::time`] with live frames received on `ifindex` (the wrapper restores each
    /// frame, so every batch sees the input): raw ns per frame.
    pub(crate) fn time_live(
        &mut self,
        target: &ProgramFd,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> f64 {
        self.frames
            .set(0, bench_frame(frame), 0)
            .expect("write BENCH_FRAME");
        self.targets.set(0, target, 0).unwrap();
        duration_ns(vip_tests::live::run_live(
            self.wrapper(),
            frame,
            ifindex,
            repeat,
        ))
    }

    /// The trivial program's time run directly and behind the wrapper.
    pub(crate) fn time_floor(&mut self, frame: &[u8]) -> (f64, f64) {
        let floor: &mut Xdp = self
            .ebpf
            .program_mut(BENCH_FLOOR_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let direct = timed(floor, frame, REPEAT).0;
        let floor_fd = self.floor_fd.try_clone().unwrap();
        let (wrapped, action, out) = self.time(&floor_fd, frame, REPEAT);
        assert_eq!(
            (action, out.as_slice()),
            (XDP_TX, frame),
            "floor through the wrapper"
        );
        (direct, wrapped)
    }

    /// `RUNS` timed runs of `repeat` iterations of `frame` through `lb_fd`, the wrapper writing
    /// another IPv4 source address into every iteration's frame (1, 2, ...; from 1 again every
    /// run if `anew`, else counting on across runs): raw ns per packet.
    pub(crate) fn flows_in_turn(
        &mut self,
        lb_fd: &ProgramFd,
        frame: &Frame,
        repeat: u32,
        anew: bool,
    ) -> Vec<f64> {
        let frame = frame.build();
        self.start_flows_in_turn(&frame);
        (0..RUNS)
            .map(|_| {
                if anew {
                    self.start_flows_in_turn(&frame);
                }
                self.time_flows_in_turn(lb_fd, &frame, repeat)
            })
            .collect()
    }

    /// Sets `frame` as the input of [`Self::time_flows_in_turn`], its source address counting
    /// from 1.
    pub(crate) fn start_flows_in_turn(&mut self, frame: &[u8]) {
        let mut spread = bench_frame(frame);
        spread.new_flow_at = (ETH_HLEN + 12) as u32;
        self.frames.set(0, spread, 0).expect("write BENCH_FRAME");
    }

    /// One timed run of `repeat` iterations through `lb_fd` of the frame set by
    /// [`Self::start_flows_in_turn`], each iteration with the next source address (counting on
    /// across runs and programs): raw ns per packet.
    pub(crate) fn time_flows_in_turn(
        &mut self,
        lb_fd: &ProgramFd,
        frame: &[u8],
        repeat: u32,
    ) -> f64 {
        self.targets.set(0, lb_fd, 0).unwrap();
        let (ns, action, _) = timed(self.wrapper(), frame, repeat);
        assert_eq!(action, XDP_TX, "flows in turn");
        ns
    }

    /// Net ns per packet of an established flow (`frame`, a TCP ACK) through `lb`: the median
    /// of `RUNS`, each run's output checked against a plain run.
    pub(crate) fn established_ns(&mut self, lb: &mut Lb, frame: &[u8]) -> f64 {
        let (want_action, want_out) = lb.run(frame);
        assert_eq!(want_action, XDP_TX);
        let lb_fd = program_fd(lb);
        let samples = (0..RUNS)
            .map(|_| {
                let (ns, action, out) = self.time(&lb_fd, frame, REPEAT);
                assert_eq!((action, &out), (want_action, &want_out), "timed output");
                ns - self.wrapped_floor
            })
            .collect();
        median(samples)
    }
}

/// One run of `repeat` iterations: mean ns per iteration as the kernel reports it, the action
/// and the last output.
fn timed(prog: &mut Xdp, frame: &[u8], repeat: u32) -> (f64, u32, Vec<u8>) {
    let o = test_run::run_xdp(prog, frame, None, repeat).expect("BPF_PROG_TEST_RUN");
    (duration_ns(o.duration), o.action, o.frame)
}

/// A descriptor of `lb`'s program, for the wrapper's program array.
pub(crate) fn program_fd(lb: &mut Lb) -> ProgramFd {
    lb.dataplane
        .program()
        .unwrap()
        .fd()
        .unwrap()
        .try_clone()
        .unwrap()
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_frame(frame: &[u8]) -> BenchFrame {
    assert!(frame.len() <= BENCH_FRAME_MAX);
    let mut f = BenchFrame {
        len: frame.len() as u32,
        new_flow_at: 0,
        seq: 0,
        _pad: 0,
        bytes: [0; BENCH_FRAME_MAX],
    };
    f.bytes[..frame.len()].copy_from_slice(frame);
    f
}
