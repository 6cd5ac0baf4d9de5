//! VIPs on `lo`: so the host (and tools such as Cilium's egress gateway) can use them, and so a
//! backend's stack accepts the decapsulated packets addressed to them.
//!
//! Addresses vip adds carry its mark in the kernel (`IFA_PROTO`, Linux 6.1+), so an agent —
//! this one or the next after a restart — removes only addresses vip added, never an address
//! an operator put on `lo` by hand.

use std::{collections::HashSet, net::IpAddr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_utils::nla::{DefaultNla, Nla};

/// `IFA_PROTO`, and vip's value for it ('v').
const IFA_PROTO: u16 = 11;
const VIP_ADDRESS_PROTO: u8 = 0x76;

#[derive(Debug, thiserror::Error)]
pub enum LoError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("the loopback interface was not found")]
    NoLoopback,
    #[error("{what} {addr} on lo")]
    Netlink {
        what: &'static str,
        addr: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Keeps the VIP addresses on `lo`.
pub struct LoopbackVips {
    handle: rtnetlink::Handle,
    index: u32,
}

impl LoopbackVips {
    /// Connects to netlink (in the caller's network namespace) on the current runtime.
    pub async fn new() -> Result<Self, LoError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LoError::Socket)?;
        tokio::spawn(connection);
        let mut links = handle.link().get().match_name("lo".into()).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| LoError::Netlink {
                what: "finding",
                addr: "lo".into(),
                source,
            })?
            .ok_or(LoError::NoLoopback)?;
        Ok(Self {
            handle,
            index: link.header.index,
        })
    }

    /// Addresses on `lo`, each with whether vip added it.
    async fn current(&self) -> Result<Vec<(IpAddr, bool, AddressMessage)>, LoError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|source| LoError::Netlink {
            what: "listing addresses",
            addr: String::new(),
            source,
        })? {
            let mut addr = None;
            let mut ours = false;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Address(a) => addr = Some(*a),
                    AddressAttribute::Other(nla) if nla.kind() == IFA_PROTO => {
                        let mut value = [0u8; 1];
                        nla.emit_value(&mut value);
                        ours = value[0] == VIP_ADDRESS_PROTO;
                    }
                    _ => {}
                }
            }
            if let Some(a) = addr {
                out.push((a, ours, msg));
            }
        }
        Ok(out)
    }

    /// Makes vip's addresses on `lo` exactly `wanted`: adds the missing ones (marked as vip's)
    /// and removes vip-marked ones no longer wanted. Addresses vip did not add are left alone,
    /// even when a VIP equals one of them. Returns (added, removed).
    pub async fn sync(&self, wanted: &[IpAddr]) -> Result<(usize, usize), LoError> {
        let current = self.current().await?;
        let present: HashSet<IpAddr> = current.iter().map(|(a, _, _)| *a).collect();
        let mut added = 0;
        for &addr in wanted.iter().filter(|a| !present.contains(a)) {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let mut req = self.handle.address().add(self.index, addr, prefix);
            req.message_mut()
                .attributes
                .push(AddressAttribute::Other(DefaultNla::new(
                    IFA_PROTO,
                    vec![VIP_ADDRESS_PROTO],
                )));
            req.execute().await.map_err(|source| LoError::Netlink {
                what: "adding",
                addr: addr.to_string(),
                source,
            })?;
            added += 1;
        }
        let mut removed = 0;
        for (addr, ours, msg) in current {
            if ours && !wanted.contains(&addr) {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|source| LoError::Netlink {
                        what: "removing",
                        addr: addr.to_string(),
                        source,
                    })?;
                removed += 1;
            }
        }
        Ok((added, removed))
    }
}
