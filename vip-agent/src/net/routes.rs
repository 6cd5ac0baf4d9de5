//! VIPs as host routes in a kernel routing table (announcer mode `kernel`): `dev lo`, in the
//! configured table, with vip's protocol number, which is how vip tells its routes from anyone
//! else's. A routing daemon on the node (BIRD `learn`, FRR `redistribute table`) announces them.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::RouteMessageBuilder;

/// What went wrong with the kernel's routes.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("the loopback interface was not found")]
    NoLoopback,
    #[error("{what} {addr} in table {table}")]
    Netlink {
        what: &'static str,
        addr: String,
        table: u32,
        #[source]
        source: rtnetlink::Error,
    },
}

/// vip's routes in one table.
pub struct KernelRoutes {
    handle: rtnetlink::Handle,
    lo: u32,
    table: u32,
    protocol: u8,
}

/// A route message's table (the attribute when the table id does not fit the header).
fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn destination_of(msg: &RouteMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => match d {
            netlink_packet_route::route::RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
            netlink_packet_route::route::RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        },
        _ => None,
    })
}

impl KernelRoutes {
    /// Connects to netlink (in the caller's network namespace) on the current runtime.
    pub async fn new(table: u32, protocol: u8) -> Result<Self, RoutesError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutesError::Socket)?;
        tokio::spawn(connection);
        let lo = handle
            .link()
            .get()
            .match_name("lo".into())
            .execute()
            .try_next()
            .await
            .map_err(|source| RoutesError::Netlink {
                what: "finding",
                addr: "lo".into(),
                table,
                source,
            })?
            .ok_or(RoutesError::NoLoopback)?
            .header
            .index;
        Ok(Self {
            handle,
            lo,
            table,
            protocol,
        })
    }

    /// vip's routes in the table now.
    async fn current(&self) -> Result<Vec<(IpAddr, RouteMessage)>, RoutesError> {
        let mut out = Vec::new();
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for dump in dumps {
            let mut stream = self.handle.route().get(dump).execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|source| self.error("listing routes", String::new(), source))?
            {
                if table_of(&msg) == self.table
                    && u8::from(msg.header.protocol) == self.protocol
                    && let Some(dst) = destination_of(&msg)
                {
                    out.push((dst, msg));
                }
            }
        }
        Ok(out)
    }

    fn error(&self, what: &'static str, addr: String, source: rtnetlink::Error) -> RoutesError {
        RoutesError::Netlink {
            what,
            addr,
            table: self.table,
            source,
        }
    }

    /// Makes vip's routes in the table exactly `wanted` (host routes); returns (added, removed).
    pub async fn sync(&self, wanted: &[IpAddr]) -> Result<(usize, usize), RoutesError> {
        let current = self.current().await?;
        let present: HashSet<IpAddr> = current.iter().map(|(a, _)| *a).collect();
        let mut added = 0;
        for &addr in wanted.iter().filter(|a| !present.contains(a)) {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(addr, prefix)
                .expect("a host prefix of the address's own family")
                .output_interface(self.lo)
                .table_id(self.table)
                .protocol(RouteProtocol::from(self.protocol))
                .scope(RouteScope::Link)
                .build();
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|source| self.error("adding", addr.to_string(), source))?;
            added += 1;
        }
        let mut removed = 0;
        for (addr, msg) in current {
            if !wanted.contains(&addr) {
                self.handle
                    .route()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|source| self.error("removing", addr.to_string(), source))?;
                removed += 1;
            }
        }
        Ok((added, removed))
    }
}
