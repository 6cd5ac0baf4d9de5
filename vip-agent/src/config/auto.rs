//! `"auto"` for the addresses that differ per node (`node.source_v4`, `node.source_v6`,
//! `bgp.router_id`, `bgp.next_hop_v6`, `backend.addresses`): taken from the node's first
//! interface in `node.interfaces` (all of them for `backend.addresses`) when the config is
//! loaded, so one config serves a fleet.
//!
//! - IPv4: the interface's primary address (the first the kernel lists).
//! - IPv6: its first global address (not link-local, not deprecated by the kernel's order).
//! - `bgp.router_id`: the node's IPv4 source, else the first interface's primary IPv4 address.
//! - `backend.addresses`: every IPv4 and global IPv6 address of the listed interfaces.

use std::{
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};

/// A value as written: `"auto"` or the value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AutoOr<T> {
    Auto,
    Value(T),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        if value.as_str() == Some("auto") {
            return Ok(AutoOr::Auto);
        }
        value
            .try_into()
            .map(AutoOr::Value)
            .map_err(serde::de::Error::custom)
    }
}

impl<T> AutoOr<T> {
    /// The value as written, or what `auto` finds on the host.
    pub(super) fn resolve(self, auto: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        match self {
            AutoOr::Auto => auto(),
            AutoOr::Value(v) => Ok(v),
        }
    }
}

/// The node's interface addresses, in the kernel's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddresses(Vec<(String, IpAddr)>);

impl HostAddresses {
    /// `(interface, address)` pairs, for tests and for callers that know them.
    pub fn new(addresses: Vec<(String, IpAddr)>) -> Self {
        Self(addresses)
    }

    /// This host's addresses (getifaddrs, in the calling thread's network namespace).
    pub fn read() -> std::io::Result<Self> {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a linked list we free below.
        if unsafe { libc::getifaddrs(&mut list) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut cursor = list;
        while !cursor.is_null() {
            // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
            let entry = unsafe { &*cursor };
            cursor = entry.ifa_next;
            if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
                continue;
            }
            // SAFETY: a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(entry.ifa_name) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: an address whose family field says which sockaddr it is.
            let address = unsafe {
                match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                        IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => continue,
                }
            };
            out.push((name, address));
        }
        // SAFETY: the list getifaddrs allocated, freed once.
        unsafe { libc::freeifaddrs(list) };
        Ok(Self(out))
    }

    fn of<'a>(&'a self, interface: &'a str) -> impl Iterator<Item = IpAddr> + 'a {
        self.0
            .iter()
            .filter(move |(name, _)| name == interface)
            .map(|(_, a)| *a)
    }

    /// The interface's primary IPv4 address.
    pub(super) fn ipv4(&self, interface: &str) -> Result<Ipv4Addr, String> {
        self.of(interface)
            .find_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| format!("\"auto\": {interface} has no IPv4 address"))
    }

    /// The interface's first global IPv6 address.
    pub(super) fn ipv6(&self, interface: &str) -> Result<Ipv6Addr, String> {
        self.of(interface)
            .find_map(|a| match a {
                IpAddr::V6(a) if is_global_v6(a) => Some(a),
                _ => None,
            })
            .ok_or_else(|| format!("\"auto\": {interface} has no global IPv6 address"))
    }

    /// Every IPv4 and global IPv6 address of `interfaces`.
    pub(super) fn all(&self, interfaces: &[String]) -> Result<Vec<IpAddr>, String> {
        let all: Vec<IpAddr> = interfaces
            .iter()
            .flat_map(|i| self.of(i))
            .filter(|a| match a {
                IpAddr::V4(_) => true,
                IpAddr::V6(a) => is_global_v6(*a),
            })
            .collect();
        if all.is_empty() {
            return Err(format!("\"auto\": no address on {}", interfaces.join(", ")));
        }
        Ok(all)
    }
}

fn is_global_v6(a: Ipv6Addr) -> bool {
    !a.is_loopback() && !a.is_unicast_link_local() && !a.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostAddresses {
        HostAddresses::new(vec![
            ("eth0".into(), "fe80::1".parse().unwrap()),
            ("eth0".into(), "192.0.2.11".parse().unwrap()),
            ("eth0".into(), "192.0.2.99".parse().unwrap()),
            ("eth0".into(), "2001:db8::11".parse().unwrap()),
            ("eth1".into(), "198.51.100.11".parse().unwrap()),
        ])
    }

    #[test]
    fn primary_and_global_addresses() {
        let h = host();
        assert_eq!(h.ipv4("eth0"), Ok("192.0.2.11".parse().unwrap()));
        assert_eq!(h.ipv6("eth0"), Ok("2001:db8::11".parse().unwrap()));
        assert!(h.ipv6("eth1").unwrap_err().contains("eth1"));
        assert_eq!(
            h.all(&["eth0".into(), "eth1".into()]).unwrap().len(),
            4,
            "link-local left out"
        );
        assert!(h.all(&["eth9".into()]).is_err());
    }

    #[test]
    fn reads_this_hosts_loopback() {
        let h = HostAddresses::read().unwrap();
        assert_eq!(h.ipv4("lo"), Ok(Ipv4Addr::LOCALHOST));
    }
}
