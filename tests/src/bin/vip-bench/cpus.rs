//! Every CPU at once: the same VIP's traffic timed on each core in parallel (a thread pinned to
//! each, each with a harness of its own in front of the one load balancer), against one core
//! alone. A datapath that serialised on a lock or bounced a shared cache line between cores
//! would take longer per packet together than alone.

use std::{fmt::Write as _, sync::Barrier};

use aya::programs::ProgramFd;
use vip_tests::{fixture::*, packet::*};

use crate::harness::{Harness, REPEAT, median, program_fd};

/// Rounds per thread and workload (each `REPEAT` packets).
const ROUNDS: usize = 7;

/// What each core sends.
#[derive(Clone, Copy)]
enum Load {
    /// One established flow (the per-CPU flow cache serves it).
    Established,
    /// A new flow every packet: the Maglev path and an insert into the shared conntrack table.
    NewFlows,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Established => "established TCP (one flow per core)",
            Load::NewFlows => "first ACKs of new flows (conntrack inserts)",
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raw ns per packet on each of `cpus` cores sending `load` at once (the median of each
/// core's rounds).
fn time_on(cpus: usize, lb_fd: &ProgramFd, load: Load) -> Vec<f64> {
    let established = Frame::tcp("198.18.60.1", 40000, "198.18.100.1", 80, TCP_ACK);
    let barrier = Barrier::new(cpus);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                let fd = lb_fd.try_clone().expect("program fd");
                let (barrier, established) = (&barrier, &established);
                scope.spawn(move || {
                    pin(cpu);
                    let mut harness = Harness::load();
                    // Each core a client port of its own, so the flows of two cores differ
                    // (new flows rewrite the source address, not the port).
                    let mut frame = established.clone();
                    frame.sport = 40000 + cpu as u16;
                    let bytes = frame.build();
                    harness.time(&fd, &bytes, 1);
                    barrier.wait();
                    let rounds: Vec<f64> = match load {
                        Load::Established => (0..ROUNDS)
                            .map(|_| harness.time(&fd, &bytes, REPEAT).0)
                            .collect(),
                        Load::NewFlows => harness.flows_in_turn(&fd, &frame, REPEAT, false),
                    };
                    median(rounds)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("timing thread"))
            .collect()
    })
}

/// The report's section: each load alone on one core and on every core at once.
pub(crate) fn every_cpu(md: &mut String, lb: &mut Lb) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(md, "\n## Every CPU at once\n").unwrap();
    if cpus < 2 {
        writeln!(md, "Not measured: this machine has one CPU.").unwrap();
        return;
    }
    writeln!(
        md,
        "The same VIP's packets timed on each of the {cpus} cores in parallel (a thread pinned \
         to each, each behind a wrapper of its own, one load balancer and its shared conntrack \
         tables), against one core alone; raw ns per packet (wrapper included), the median of \
         each core's rounds. \"Together / alone\" near 1.0: the cores do not wait for each \
         other.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| load | alone ns | together ns (per core) | together / alone |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    let lb_fd = program_fd(lb);
    for load in [Load::Established, Load::NewFlows] {
        let alone = time_on(1, &lb_fd, load)[0];
        let together = time_on(cpus, &lb_fd, load);
        let per_core: Vec<String> = together.iter().map(|ns| format!("{ns:.1}")).collect();
        let mean = together.iter().sum::<f64>() / together.len() as f64;
        writeln!(
            md,
            "| {} | {alone:.1} | {} | {:.2} |",
            load.name(),
            per_core.join(", "),
            mean / alone
        )
        .unwrap();
    }
}
