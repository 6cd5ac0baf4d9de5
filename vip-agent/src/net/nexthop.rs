//! Resolving each backend's next hop (egress interface and MACs) from the kernel's routes and
//! neighbours, so nobody configures a gateway MAC by hand.
//!
//! For each backend: a route lookup (`RTM_GETROUTE` for the address, as `ip route get` does)
//! gives the egress interface and gateway; the neighbour table gives the gateway's (or the
//! backend's own) MAC; the link gives the interface's MAC. A backend whose neighbour is not
//! known yet stays unresolved (the datapath then asks `bpf_fib_lookup`), and the resolver makes
//! the kernel resolve it: packets the XDP program forwards never touch the neighbour table, so
//! nothing else would. It sends one byte to the backend's discard port (UDP 9), which makes the
//! kernel resolve (or re-confirm a stale) neighbour; the kernel's neighbour event then triggers
//! the next refresh ([`KernelChanges`]).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::{
    constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
    sys::AsyncSocket,
};

/// A resolved next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Every message of a netlink dump.
async fn dump<T>(
    stream: impl futures::TryStream<Ok = T, Error = rtnetlink::Error>,
    what: &'static str,
) -> Result<Vec<T>, NextHopError> {
    stream
        .try_collect()
        .await
        .map_err(|source| NextHopError::Netlink { what, source })
}

/// A usable neighbour entry.
#[derive(Clone, Copy)]
struct Neighbour {
    mac: [u8; 6],
    /// Usable, but the kernel wants it confirmed.
    stale: bool,
}

/// Makes the kernel resolve the neighbour toward `backend`: one byte to its discard port.
fn nudge(backend: IpAddr) {
    let bind: SocketAddr = match backend {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    if let Err(e) = UdpSocket::bind(bind).and_then(|s| s.send_to(&[0], (backend, 9))) {
        tracing::debug!(%backend, error = %e, "neighbour nudge");
    }
}

/// The kernel's route, neighbour and link changes: the signal to resolve next hops again.
pub struct KernelChanges {
    messages: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    _handle: rtnetlink::Handle,
}

/// How long a burst of changes (a route change brings neighbour and link messages) may take to
/// settle before next hops are resolved once for all of it.
const SETTLE: Duration = Duration::from_millis(50);

impl KernelChanges {
    /// Subscribes (in the caller's network namespace) on the current runtime.
    pub fn subscribe() -> Result<Self, NextHopError> {
        let (mut connection, handle, messages) =
            rtnetlink::new_connection().map_err(NextHopError::Socket)?;
        let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
            .map_err(NextHopError::Socket)?;
        tokio::spawn(connection);
        Ok(Self {
            messages,
            _handle: handle,
        })
    }

    /// Waits for a change and lets its burst settle. `None`: the subscription ended.
    pub async fn next(&mut self) -> Option<()> {
        self.messages.next().await?;
        tokio::time::sleep(SETTLE).await;
        while self.messages.try_recv().is_ok() {}
        Some(())
    }
}

/// Answers "how do I reach this backend" from the kernel.
pub struct Resolver {
    handle: rtnetlink::Handle,
}

impl Resolver {
    /// Opens a netlink connection (in the caller's network namespace) on the current runtime.
    pub fn new() -> Result<Self, NextHopError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NextHopError::Socket)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Next hops of all `backends` that the kernel can fully resolve now.
    pub async fn resolve_all(
        &self,
        backends: &[IpAddr],
    ) -> Result<HashMap<IpAddr, NextHop>, NextHopError> {
        let links = self.link_macs().await?;
        let neighbours = self.neighbours().await?;
        let mut out = HashMap::new();
        for &backend in backends {
            let Some((ifindex, gateway)) = self.route(backend).await? else {
                continue;
            };
            let via = gateway.unwrap_or(backend);
            let neighbour = neighbours.get(&(ifindex, via));
            if neighbour.is_none_or(|n| n.stale) {
                nudge(backend);
            }
            if let (Some(&src_mac), Some(n)) = (links.get(&ifindex), neighbour) {
                out.insert(
                    backend,
                    NextHop {
                        ifindex,
                        src_mac,
                        dst_mac: n.mac,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The route the kernel would use for `dst`: (egress ifindex, gateway if any).
    async fn route(&self, dst: IpAddr) -> Result<Option<(u32, Option<IpAddr>)>, NextHopError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match dst {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        // A lookup, not a dump: the kernel answers with the one route it would use.
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut responses = handle
            .request(req)
            .map_err(|source| NextHopError::Netlink {
                what: "route lookup",
                source,
            })?;
        while let Some(message) = responses.next().await {
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    let mut oif = None;
                    let mut gateway = None;
                    for attr in route.attributes {
                        match attr {
                            RouteAttribute::Oif(i) => oif = Some(i),
                            RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                                gateway = Some(IpAddr::V4(a))
                            }
                            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                                gateway = Some(IpAddr::V6(a))
                            }
                            _ => {}
                        }
                    }
                    return Ok(oif.map(|i| (i, gateway)));
                }
                // No route (ENETUNREACH and friends): not resolvable now.
                NetlinkPayload::Error(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Usable neighbour entries by (ifindex, address).
    async fn neighbours(&self) -> Result<HashMap<(u32, IpAddr), Neighbour>, NextHopError> {
        let all = dump(self.handle.neighbours().get().execute(), "neighbour dump").await?;
        let mut out = HashMap::new();
        for n in all {
            if !matches!(
                n.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            ) {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for attr in n.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(a))
                    }
                    NeighbourAttribute::LinkLocalAddress(l) => mac = <[u8; 6]>::try_from(l).ok(),
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                let stale = n.header.state == NeighbourState::Stale;
                out.insert((n.header.ifindex, dst), Neighbour { mac, stale });
            }
        }
        Ok(out)
    }

    /// MAC address of every Ethernet-like link.
    async fn link_macs(&self) -> Result<HashMap<u32, [u8; 6]>, NextHopError> {
        let links = dump(self.handle.link().get().execute(), "link dump").await?;
        let mut out = HashMap::new();
        for link in links {
            for attr in link.attributes {
                if let LinkAttribute::Address(a) = attr
                    && let Ok(mac) = <[u8; 6]>::try_from(a)
                {
                    out.insert(link.header.index, mac);
                }
            }
        }
        Ok(out)
    }
}
