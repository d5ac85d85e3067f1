//! The client address of a request: the peer's, or, behind a trusted reverse proxy
//! (`VOICEGATE_TRUSTED_PROXIES`), the one its `X-Forwarded-For` names.

use std::net::IpAddr;

/// `VOICEGATE_TRUSTED_PROXIES`: addresses and CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parses `10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8` items (blank items are skipped).
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let bad = || format!("{item:?} is not an IP address or CIDR block");
            let (ip, len) = match item.split_once('/') {
                Some((ip, len)) => (ip, Some(len.parse::<u8>().map_err(|_| bad())?)),
                None => (item, None),
            };
            let ip: IpAddr = ip.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = len.unwrap_or(max);
            if len > max {
                return Err(bad());
            }
            nets.push((ip, len));
        }
        Ok(TrustedProxies { nets })
    }

    /// No proxy is trusted (`X-Forwarded-For` is never read).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets
            .iter()
            .any(|&(net, len)| prefix(canonical(net), len) == prefix(ip, len))
    }

    /// The client of a request from `peer`: `X-Forwarded-For` (all its header lines, in order) is
    /// believed only from a trusted peer, right to left, up to the first address that is not a proxy.
    pub fn client(&self, peer: Option<IpAddr>, forwarded: &[&str]) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.contains(peer) {
            return Some(peer);
        }
        let mut client = peer;
        for entry in forwarded.iter().rev().flat_map(|line| line.rsplit(',')) {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                // An entry we cannot read: the last address we could vouch for stands.
                break;
            };
            client = canonical(ip);
            if !self.contains(client) {
                break;
            }
        }
        Some(client)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The first `len` bits of `ip` (the rest zero), as a comparable number tagged by family.
fn prefix(ip: IpAddr, len: u8) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u128::from(u32::from(v4));
            let keep = u32::from(len.min(32));
            let mask = if keep == 0 {
                0
            } else {
                (!0u128 >> (128 - keep)) << (32 - keep)
            };
            (false, bits & mask)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u32::from(len.min(128));
            let mask = if keep == 0 { 0 } else { !0u128 << (128 - keep) };
            (true, bits & mask)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted =
            TrustedProxies::parse(&["10.0.0.0/8".to_owned(), " ::1 ".to_owned(), String::new()])
                .unwrap_or_else(|e| panic!("{e}"));
        let peer = ip("10.1.2.3");
        assert_eq!(trusted.client(peer, &["203.0.113.9"]), ip("203.0.113.9"));
        // The client's own claims (left) are skipped up to the first untrusted hop.
        assert_eq!(
            trusted.client(peer, &["1.1.1.1, 203.0.113.9", "10.9.9.9"]),
            ip("203.0.113.9")
        );
        assert_eq!(trusted.client(peer, &["garbage"]), peer);
        assert_eq!(trusted.client(peer, &[]), peer);
        assert_eq!(
            trusted.client(ip("::1"), &["198.51.100.1"]),
            ip("198.51.100.1")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            trusted.client(ip("192.0.2.5"), &["203.0.113.9"]),
            ip("192.0.2.5")
        );
        assert_eq!(
            TrustedProxies::default().client(peer, &["203.0.113.9"]),
            peer
        );
    }

    #[test]
    fn bad_trusted_proxies_are_refused() {
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.1/x", "::/129"] {
            assert!(TrustedProxies::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
        let ok = TrustedProxies::parse(&["0.0.0.0/0".to_owned()]).unwrap_or_default();
        assert!(ok.contains("8.8.8.8".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
    }
}
