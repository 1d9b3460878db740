//! Route parsing and rewriting for the edge proxy, as plain functions over strings: which
//! instance a path names, what path the workspace receives, how `Location` and `Set-Cookie`
//! headers are brought back under the instance's prefix, and which requests count as a user's
//! activity. The proxy's Pingora hooks call these and nothing else decides.

use super::ids::is_instance_id;

/// What a request path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/i-<id>/<rest>`: `rest` starts with `/`.
    Instance { id: &'a str, rest: &'a str },
    /// `/i-<id>` without its trailing slash: redirect to `/i-<id>/`.
    InstanceRoot { id: &'a str },
    /// Anything else: the default upstream, or a 404.
    Other,
}

/// Parses a request path (without the query). Allocation-free: it runs on every request.
pub fn parse(path: &str) -> Target<'_> {
    let Some(after) = path.strip_prefix('/') else {
        return Target::Other;
    };
    let (first, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    if !is_instance_id(first) {
        return Target::Other;
    }
    if rest.is_empty() {
        Target::InstanceRoot { id: first }
    } else {
        Target::Instance { id: first, rest }
    }
}

/// The instance a `Host` header names under host routing: `i-<id>.<domain>[:port]`.
pub fn host_instance<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let (first, rest) = name.split_once('.')?;
    (rest.eq_ignore_ascii_case(domain) && is_instance_id(first)).then_some(first)
}

/// The path and query the workspace receives: without the prefix for purposes that are
/// served from their root (RStudio), unchanged for purposes that know their base URL
/// (JupyterLab).
pub fn upstream_path(
    full_path: &str,
    rest: &str,
    query: Option<&str>,
    strip_prefix: bool,
) -> String {
    let path = if strip_prefix { rest } else { full_path };
    match query {
        Some(q) => {
            let mut out = String::with_capacity(path.len() + q.len() + 1);
            out.push_str(path);
            out.push('?');
            out.push_str(q);
            out
        }
        None => path.to_owned(),
    }
}

/// Rewrites a `Location` the workspace sent so that the browser stays under `/<id>/`:
/// absolute URLs that point at the upstream itself, and root-relative paths outside the
/// prefix, get the prefix. Other absolute URLs and relative paths are left alone. Returns
/// `None` when nothing changes.
pub fn rewrite_location(location: &str, id: &str, upstream_hosts: &[&str]) -> Option<String> {
    let path = if is_absolute(location) {
        let path = path_on_upstream(location, upstream_hosts)?;
        if path.is_empty() || !path.starts_with('/') {
            return Some(format!("/{id}/{path}"));
        }
        path
    } else if location.starts_with('/') {
        location
    } else {
        return None;
    };
    if under_prefix(path, id) {
        // An absolute URL to the upstream that already carries the prefix: drop the host.
        return (path != location).then(|| path.to_owned());
    }
    Some(format!("/{id}{path}"))
}

fn is_absolute(location: &str) -> bool {
    location.starts_with("http://")
        || location.starts_with("https://")
        || location.starts_with("//")
}

/// The path, query and fragment of an absolute URL (`http://`, `https://` or `//`) whose
/// authority is one of the upstream's own; `None` for any other URL.
fn path_on_upstream<'a>(location: &'a str, upstream_hosts: &[&str]) -> Option<&'a str> {
    let rest = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))
        .or_else(|| location.strip_prefix("//"))?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    upstream_hosts
        .iter()
        .any(|h| authority.eq_ignore_ascii_case(h))
        .then_some(path)
}

/// Under host routing: an absolute `Location` that points at the upstream itself loses its
/// origin, so the browser stays on the workspace's own host. `None` when nothing changes.
pub fn strip_upstream_origin(location: &str, upstream_hosts: &[&str]) -> Option<String> {
    let path = path_on_upstream(location, upstream_hosts)?;
    Some(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
}

/// Whether `path` lies under `/<id>` (the prefix itself included).
fn under_prefix(path: &str, id: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(id))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
}

/// What becomes of a workspace's `Set-Cookie` under a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieScope {
    /// Already scoped to the instance: passed on as written.
    Keep,
    /// Passed on as this, its `Path` under the instance.
    Scoped(String),
    /// Not a cookie a browser would store (RFC 6265 §5.2: no `=` in its first part, or no
    /// name): dropped, never passed on unscoped.
    Drop,
}

/// Scopes a `Set-Cookie` to the instance, reading it as a browser does (RFC 6265 §5.2):
/// attributes split at `;`, names trimmed and compared without case, the last `Path` the one
/// that counts (a value not starting with `/` counts as none). A cookie whose only `Path` is
/// under `/<id>` is kept as written; any other gets one `Path` under `/<id>`, so that two
/// workspaces behind one host never set cookies on each other's paths.
pub fn scope_set_cookie(cookie: &str, id: &str) -> CookieScope {
    let mut parts = cookie.split(';');
    let pair = parts.next().unwrap_or_default();
    match pair.split_once('=') {
        Some((name, _)) if !name.trim().is_empty() => {}
        _ => return CookieScope::Drop,
    }
    let (mut paths, mut last) = (0, None);
    for attribute in cookie.split(';').skip(1) {
        let (name, value) = attribute.split_once('=').unwrap_or((attribute, ""));
        if name.trim().eq_ignore_ascii_case("path") {
            paths += 1;
            let value = value.trim();
            last = value.starts_with('/').then_some(value);
        }
    }
    if paths == 1 && last.is_some_and(|path| under_prefix(path, id)) {
        return CookieScope::Keep;
    }
    let mut out = pair.trim().to_owned();
    for attribute in parts {
        let (name, value) = match attribute.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (attribute.trim(), None),
        };
        if name.is_empty() || name.eq_ignore_ascii_case("path") {
            continue;
        }
        out.push_str("; ");
        out.push_str(name);
        if let Some(value) = value {
            out.push('=');
            out.push_str(value);
        }
    }
    match last {
        Some(path) if under_prefix(path, id) => {
            out.push_str("; Path=");
            out.push_str(path);
        }
        Some(path) => {
            out.push_str(&format!("; Path=/{id}/{}", path.trim_start_matches('/')));
        }
        None => out.push_str(&format!("; Path=/{id}/")),
    }
    CookieScope::Scoped(out)
}

/// [`scope_set_cookie`] for callers that keep what cannot be scoped out of the answer
/// themselves: `None` when the cookie is kept as written or dropped.
pub fn rewrite_set_cookie(cookie: &str, id: &str) -> Option<String> {
    match scope_set_cookie(cookie, id) {
        CookieScope::Scoped(scoped) => Some(scoped),
        CookieScope::Keep | CookieScope::Drop => None,
    }
}

/// A request that is not a user's action but a purpose's keepalive: RStudio's
/// `POST /events/get_events` long poll, which an idle open tab sends forever, or JupyterLab's
/// background `GET`s of its REST API. Written `METHOD /path` or `/path`; without a method it
/// matches `GET` and `HEAD` only, so that a save, an upload or a kernel start on the same
/// paths counts as the user's. The path is relative to the workspace root (the prefix
/// stripped); a `*` at its end matches by prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    method: Option<String>,
    pattern: String,
}

impl Keepalive {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (method, pattern) = match text.trim().split_once(' ') {
            Some((method, pattern)) => (Some(method.trim()), pattern.trim()),
            None => (None, text.trim()),
        };
        if let Some(method) = method {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "`{text}`: the method must be an upper-case HTTP method like GET or POST, followed by one space and the path"
                ));
            }
        }
        if !pattern.starts_with('/') || pattern.contains(char::is_whitespace) {
            return Err(format!(
                "`{text}`: write `METHOD /path` or `/path`, the path starting with `/` (a `*` at its end matches by prefix)"
            ));
        }
        Ok(Self {
            method: method.map(str::to_owned),
            pattern: pattern.to_owned(),
        })
    }

    pub fn matches(&self, method: &str, path: &str) -> bool {
        let method_matches = match &self.method {
            Some(m) => m == method,
            None => method == "GET" || method == "HEAD",
        };
        method_matches
            && match self.pattern.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == self.pattern,
            }
    }
}

impl std::fmt::Display for Keepalive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.method {
            Some(m) => write!(f, "{m} {}", self.pattern),
            None => f.write_str(&self.pattern),
        }
    }
}

/// Whether a request is a user's action, not one of the purpose's keepalives.
pub fn is_user_activity(method: &str, path: &str, keepalives: &[Keepalive]) -> bool {
    !keepalives.iter().any(|k| k.matches(method, path))
}

/// `X-Forwarded-Port` for a `Host` header: its port, or the scheme's default.
pub fn forwarded_port(host: &str, https: bool) -> &str {
    match host.rsplit_once(':') {
        // An IPv6 literal without a port ends in `]`.
        Some((_, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => port,
        _ if https => "443",
        _ => "80",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "i-0123456789abcdef0";

    #[test]
    fn paths_are_parsed() {
        let cases = [
            (
                "/i-0123456789abcdef0/",
                Target::Instance { id: ID, rest: "/" },
            ),
            (
                "/i-0123456789abcdef0/a/b",
                Target::Instance {
                    id: ID,
                    rest: "/a/b",
                },
            ),
            ("/i-0123456789abcdef0", Target::InstanceRoot { id: ID }),
            (
                "/i-0123456789abcdef0//x",
                Target::Instance {
                    id: ID,
                    rest: "//x",
                },
            ),
            ("/", Target::Other),
            ("", Target::Other),
            ("/favicon.ico", Target::Other),
            ("/i-0123456789ABCDEF0/", Target::Other),
            ("/i-0123/", Target::Other),
            ("//i-0123456789abcdef0/", Target::Other),
            ("/x/i-0123456789abcdef0/", Target::Other),
        ];
        for (path, expected) in cases {
            assert_eq!(parse(path), expected, "{path}");
        }
    }

    #[test]
    fn hosts_name_instances_under_host_routing() {
        let d = "ws.example.com";
        assert_eq!(
            host_instance("i-0123456789abcdef0.ws.example.com", d),
            Some(ID)
        );
        assert_eq!(
            host_instance("i-0123456789abcdef0.WS.example.com:8443", d),
            Some(ID)
        );
        assert_eq!(host_instance("ws.example.com", d), None);
        assert_eq!(host_instance("i-0123456789abcdef0.evil.com", d), None);
        assert_eq!(
            host_instance("x.i-0123456789abcdef0.ws.example.com", d),
            None
        );
        assert_eq!(host_instance("i-zz.ws.example.com", d), None);
    }

    #[test]
    fn upstream_paths_keep_queries_and_encodings() {
        let full = "/i-0123456789abcdef0/a%20b/c";
        assert_eq!(
            upstream_path(full, "/a%20b/c", Some("x=1&y=%2F"), true),
            "/a%20b/c?x=1&y=%2F"
        );
        assert_eq!(upstream_path(full, "/a%20b/c", None, false), full);
    }

    #[test]
    fn locations_are_brought_under_the_prefix() {
        let hosts = ["127.0.0.1:4000", "10.0.0.5:8787"];
        let cases = [
            ("/landed", Some("/i-0123456789abcdef0/landed")),
            ("/", Some("/i-0123456789abcdef0/")),
            ("/i-0123456789abcdef0/landed", None),
            ("/i-0123456789abcdef0", None),
            (
                "/i-0123456789abcdef0x/landed",
                Some("/i-0123456789abcdef0/i-0123456789abcdef0x/landed"),
            ),
            (
                "http://127.0.0.1:4000/landed?a=1",
                Some("/i-0123456789abcdef0/landed?a=1"),
            ),
            ("http://10.0.0.5:8787", Some("/i-0123456789abcdef0/")),
            (
                "https://10.0.0.5:8787/i-0123456789abcdef0/x",
                Some("/i-0123456789abcdef0/x"),
            ),
            ("//127.0.0.1:4000/x", Some("/i-0123456789abcdef0/x")),
            ("https://example.com/login", None),
            ("landed", None),
            ("../up", None),
        ];
        for (location, expected) in cases {
            assert_eq!(
                rewrite_location(location, ID, &hosts).as_deref(),
                expected,
                "{location}"
            );
        }
    }

    #[test]
    fn host_routing_keeps_redirects_on_the_workspace_host() {
        let hosts = ["10.0.0.5:8787"];
        assert_eq!(
            strip_upstream_origin("http://10.0.0.5:8787/x?y", &hosts).as_deref(),
            Some("/x?y")
        );
        assert_eq!(
            strip_upstream_origin("http://10.0.0.5:8787", &hosts).as_deref(),
            Some("/")
        );
        assert_eq!(strip_upstream_origin("/x", &hosts), None);
        assert_eq!(strip_upstream_origin("https://example.com/x", &hosts), None);
    }

    #[test]
    fn cookies_are_scoped_to_the_instance() {
        let scoped = |c: &str| CookieScope::Scoped(c.to_owned());
        let cases = [
            (
                "s=1; Path=/; HttpOnly",
                scoped("s=1; HttpOnly; Path=/i-0123456789abcdef0/"),
            ),
            ("s=1", scoped("s=1; Path=/i-0123456789abcdef0/")),
            (
                "s=1; path=/app",
                scoped("s=1; Path=/i-0123456789abcdef0/app"),
            ),
            ("s=1; Path=/i-0123456789abcdef0", CookieScope::Keep),
            ("s=1; Path=/i-0123456789abcdef0/; Secure", CookieScope::Keep),
            (
                "s=1; abcdé",
                scoped("s=1; abcdé; Path=/i-0123456789abcdef0/"),
            ),
            // Spellings a browser reads as `Path=/` (RFC 6265 §5.2: names trimmed, no case).
            (
                "s=1; Path =/; HttpOnly",
                scoped("s=1; HttpOnly; Path=/i-0123456789abcdef0/"),
            ),
            ("s=1;PATH= / ", scoped("s=1; Path=/i-0123456789abcdef0/")),
            (
                "s=1; \tpath\t=/x",
                scoped("s=1; Path=/i-0123456789abcdef0/x"),
            ),
            // The last `Path` counts; one under the prefix followed by another is not kept.
            (
                "s=1; Path=/i-0123456789abcdef0/; Path=/",
                scoped("s=1; Path=/i-0123456789abcdef0/"),
            ),
            (
                "s=1; Path=/; Path=/i-0123456789abcdef0/a",
                scoped("s=1; Path=/i-0123456789abcdef0/a"),
            ),
            // A value not starting with `/` counts as no path.
            ("s=1; Path=x", scoped("s=1; Path=/i-0123456789abcdef0/")),
            // Not cookies: dropped.
            ("nameless", CookieScope::Drop),
            ("=1; Path=/", CookieScope::Drop),
            (" =1", CookieScope::Drop),
            ("", CookieScope::Drop),
        ];
        for (cookie, expected) in cases {
            let got = scope_set_cookie(cookie, ID);
            assert_eq!(got, expected, "{cookie}");
            if let CookieScope::Scoped(out) = got {
                assert_eq!(scope_set_cookie(&out, ID), CookieScope::Keep, "{out}");
            }
        }
    }

    #[test]
    fn keepalives_are_not_activity() {
        let rules: Vec<Keepalive> = ["POST /events/get_events", "/api/status*", "GET /api/*"]
            .iter()
            .map(|r| Keepalive::parse(r).unwrap())
            .collect();
        assert!(!is_user_activity("POST", "/events/get_events", &rules));
        assert!(is_user_activity("GET", "/events/get_events", &rules));
        assert!(!is_user_activity("GET", "/api/status/kernels", &rules));
        assert!(!is_user_activity("HEAD", "/api/status", &rules));
        // A save, a rename, an upload on a polled path: the user's.
        assert!(is_user_activity("PUT", "/api/contents/a.ipynb", &rules));
        assert!(is_user_activity("PATCH", "/api/contents/a.ipynb", &rules));
        assert!(is_user_activity("POST", "/api/sessions", &rules));
        assert!(!is_user_activity("GET", "/api/contents/a.ipynb", &rules));
        assert!(is_user_activity("POST", "/events/get_events2", &rules));
        assert!(is_user_activity("POST", "/rpc/console_input", &rules));
        assert_eq!(rules[0].to_string(), "POST /events/get_events");
        assert_eq!(rules[1].to_string(), "/api/status*");
        for bad in ["get /x", "POST", "POST  ", "events", "POST x", "/a b"] {
            assert!(Keepalive::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_ports_come_from_the_host() {
        assert_eq!(forwarded_port("edge:8081", false), "8081");
        assert_eq!(forwarded_port("edge", false), "80");
        assert_eq!(forwarded_port("edge", true), "443");
        assert_eq!(forwarded_port("[::1]", true), "443");
        assert_eq!(forwarded_port("[::1]:9000", false), "9000");
    }
}
