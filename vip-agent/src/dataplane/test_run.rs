//! Asking the datapath itself: a probe packet run through the loaded program with
//! BPF_PROG_TEST_RUN, so "which backend" is answered by the same code that forwards.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions, Xdp};
use vip_common::IPPROTO_TCP;

use super::{Dataplane, DataplaneError};

/// An Ethernet frame of a flow's non-SYN packet (a TCP ACK, or a UDP datagram).
pub fn frame(client: SocketAddr, vip: SocketAddr, proto: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&client.port().to_be_bytes());
    l4.extend_from_slice(&vip.port().to_be_bytes());
    if proto == IPPROTO_TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, 8, 0, 0]);
    }
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    match (client.ip(), vip.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let sum = !vip_common::checksum::fold_sum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => unreachable!("callers check the families match"),
    }
    f.extend_from_slice(&l4);
    f
}

/// What a test run of an XDP program did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The XDP action.
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per iteration, as the kernel measured it.
    pub duration: Duration,
}

/// Runs `frame` through `prog` `repeat` times (the kernel reuses one buffer: from the second
/// iteration on, the program sees its own output unless a wrapper restores it), as if received
/// on `ifindex` when given. The one test-run wrapper of `which`, the tests and the benchmark.
pub fn run_xdp(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: Option<u32>,
    repeat: u32,
) -> Result<Outcome, ProgramError> {
    // Room for the outer headers the program may add.
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = ifindex
        .map(|i| [0, frame.len() as u32, 0, i, 0, 0])
        .into_iter()
        .flatten()
        .flat_map(u32::to_ne_bytes)
        .collect();
    let result = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ifindex.map(|_| ctx.as_slice()),
        repeat,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(Outcome {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}

/// Runs `frame` through the load balancer once: (XDP action, output frame).
pub fn run(dataplane: &mut Dataplane, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
    let outcome = run_xdp(dataplane.program()?, frame, None, 1).map_err(|source| {
        DataplaneError::Program {
            program: vip_common::layout::LB_PROGRAM,
            source,
        }
    })?;
    Ok((outcome.action, outcome.frame))
}

/// The outer destination if the program encapsulated `input` into `out` (it grew by an outer
/// header). A frame passed with its next hop unresolved is encapsulated too.
pub fn outer_destination(input: &[u8], out: &[u8]) -> Option<IpAddr> {
    if out.len() <= input.len() {
        return None;
    }
    match out.get(12..14)? {
        [0x08, 0x00] => Some(IpAddr::from(<[u8; 4]>::try_from(out.get(30..34)?).ok()?)),
        [0x86, 0xdd] => Some(IpAddr::from(<[u8; 16]>::try_from(out.get(38..54)?).ok()?)),
        _ => None,
    }
}
