//! Who may reach an instance, decided from plain request facts: cookies, query parameters,
//! trusted networks. The proxy gathers the facts and carries out the answer.

use std::net::IpAddr;

/// The query parameter that carries a link token.
pub const LINK_PARAM: &str = "rsp_token";
/// The cookie that carries a session.
pub const SESSION_COOKIE: &str = "rstudio-pool-session";

/// The value of cookie `name` in a `Cookie` header value.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    // Matches the name at the start of each pair rather than searching every pair (tokens
    // included) for its `=`.
    header.split(';').find_map(|pair| {
        let v = pair.trim_start().strip_prefix(name)?.strip_prefix('=')?;
        Some(v.trim_end())
    })
}

/// A `Cookie` header value without cookie `name`; `None` when nothing is left.
pub fn without_cookie(header: &str, name: &str) -> Option<String> {
    let mut kept = String::new();
    for pair in header
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map(|(k, _)| k) != Some(name))
    {
        if kept.is_empty() {
            kept.reserve(header.len());
        } else {
            kept.push_str("; ");
        }
        kept.push_str(pair);
    }
    (!kept.is_empty()).then_some(kept)
}

/// Whether a query carries a link token (which [`take_link_param`] would take), without
/// allocating.
pub fn has_link_param(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == LINK_PARAM)
}

/// Splits the link token out of a query: (token, the query without it).
pub fn take_link_param(query: &str) -> (Option<&str>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((k, v)) if k == LINK_PARAM => token = Some(v),
            _ if pair == LINK_PARAM => token = Some(""),
            _ => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

/// A network in CIDR notation (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an address or network like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}` has a prefix length outside 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen through an IPv6 socket still matches IPv4 networks.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whether a path has a `.` or `..` segment, written plainly or percent-encoded. Such paths
/// are refused: what a workspace makes of them is its own business, and we do not want to
/// find out.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot written plainly or as `%2e`. Allocation-free: it runs per request.
fn is_dot_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let (mut i, mut dots) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'.' {
            i += 1;
        } else if bytes[i] == b'%'
            && bytes.len() >= i + 3
            && bytes[i + 1] == b'2'
            && (bytes[i + 2] | 0x20) == b'e'
        {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_and_removed() {
        let h = "a=1; rstudio-pool-session=tok; b=2";
        assert_eq!(cookie(h, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(
            cookie("x=1;rstudio-pool-session=t ", SESSION_COOKIE),
            Some("t")
        );
        assert_eq!(cookie("rstudio-pool-sessionx=t", SESSION_COOKIE), None);
        assert_eq!(cookie("a=rstudio-pool-session=t", SESSION_COOKIE), None);
        assert_eq!(
            without_cookie(h, SESSION_COOKIE).as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(
            without_cookie("rstudio-pool-session=tok", SESSION_COOKIE),
            None
        );
    }

    #[test]
    fn the_link_parameter_is_taken_out() {
        assert_eq!(
            take_link_param("rsp_token=abc"),
            (Some("abc"), String::new())
        );
        assert_eq!(
            take_link_param("a=1&rsp_token=abc&b=2"),
            (Some("abc"), "a=1&b=2".into())
        );
        assert_eq!(take_link_param("a=1"), (None, "a=1".into()));
        // The quick test agrees with the taking.
        for query in [
            "rsp_token=abc",
            "a=1&rsp_token",
            "a=1",
            "rsp_tokens=1",
            "",
            "x=rsp_token",
        ] {
            assert_eq!(
                has_link_param(query),
                take_link_param(query).0.is_some(),
                "{query}"
            );
        }
    }

    #[test]
    fn networks_match_addresses() {
        let n: Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("intranet".parse::<Network>().is_err());
    }

    #[test]
    fn dot_segments_are_recognised() {
        for bad in [
            "/i-1/../x",
            "/i-1/%2e%2e/x",
            "/i-1/%2E./x",
            "/i-1/./x",
            "/..",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for good in [
            "/i-1/a..b/x",
            "/i-1/.hidden",
            "/i-1/x%2fy",
            "/",
            "/i-1/.../x",
            "/i-1/%2e%2e%2e",
            "/i-1/%2",
        ] {
            assert!(!has_dot_segment(good), "{good}");
        }
    }
}
