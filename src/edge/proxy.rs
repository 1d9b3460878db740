//! The edge proxy as a Pingora `ProxyHttp`: `/i-<instanceId>/...` to the owner's workspace,
//! HTTP and WebSocket alike, with the rewriting RStudio needs. The hooks stay thin: route
//! parsing, path and header rewriting and the activity rule are the pure functions of
//! [`crate::core::route`]; instance lookups are the manager's lock-free cache.
//!
//! **Architecture invariant:** this is the only module that knows Pingora's proxy phases.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use super::spent::SpentLinks;
use crate::audit::{self, Kind as Audit};
use crate::config::{AuthConfig, DefaultUrl, ProxyConfig};
use crate::core::access::{
    cookie, has_dot_segment, has_link_param, take_link_param, without_cookie, Network,
    SESSION_COOKIE,
};
use crate::core::ids::InstanceId;
use crate::core::route::{
    forwarded_port, host_instance, is_user_activity, parse, rewrite_location, scope_set_cookie,
    strip_upstream_origin, upstream_path, CookieScope, Target,
};
use crate::core::token::{Claims, Kind, Signer};
use crate::core::wsframe::FrameScanner;
use crate::http1::request::passable_name;
use crate::manager::{Failure, PoolManager, Stage, Upstream};
use crate::metrics::{metrics, LinkOutcome, OpenSocket, ProxyPath, Refusal};
use crate::provider::process::now_ms;

/// Cheap to clone: the caches and the manager are shared, so the WebSocket tunnel
/// ([`super::tunnel`]) decides exactly as the hooks do.
#[derive(Clone)]
pub struct EdgeProxy {
    manager: Arc<PoolManager>,
    config: ProxyConfig,
    access: Access,
    /// The scheme users reach us with, for `X-Forwarded-Proto`.
    https: bool,
    /// Host names resolved off the request path (DEFAULT_URL, EC2 DNS names), with a TTL.
    resolved: moka::sync::Cache<String, SocketAddr>,
}

impl EdgeProxy {
    pub fn new(
        manager: Arc<PoolManager>,
        config: ProxyConfig,
        auth: &AuthConfig,
        signer: Option<Arc<Signer>>,
        state_dir: Option<&std::path::Path>,
    ) -> Self {
        let https = config.public_url.starts_with("https://");
        let access = match (auth, signer) {
            (
                AuthConfig::Token {
                    link_ttl,
                    session_ttl,
                    ..
                },
                Some(signer),
            ) => Access::Token {
                signer,
                session_ttl_ms: session_ttl.as_millis() as u64,
                sessions: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live((*session_ttl).min(Duration::from_secs(600)))
                    .build(),
                spent: Arc::new(SpentLinks::open(state_dir, *link_ttl, now_ms())),
            },
            (
                AuthConfig::Header {
                    header,
                    trusted_networks,
                },
                _,
            ) => Access::Header {
                header: header.clone(),
                trusted_networks: trusted_networks.clone(),
            },
            _ => Access::Open,
        };
        Self {
            manager,
            config,
            access,
            https,
            resolved: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
    }

    pub(super) fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Resolves `host:port` without blocking a worker (`HttpPeer::new` with a name would
    /// resolve synchronously and panic on failure), caching the answer.
    async fn resolve(&self, authority: &str) -> Result<SocketAddr> {
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Some(addr) = self.resolved.get(authority) {
            return Ok(addr);
        }
        let addr = tokio::net::lookup_host(authority)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("cannot resolve the upstream {authority}"),
                )
            })?;
        self.resolved.insert(authority.to_owned(), addr);
        Ok(addr)
    }
}

/// How the proxy decides who may reach an instance.
#[derive(Clone)]
enum Access {
    /// Anyone (loopback only; the configuration refuses it elsewhere).
    Open,
    Token {
        signer: Arc<Signer>,
        session_ttl_ms: u64,
        /// Session tokens already verified, so that a request costs a lookup, not an HMAC.
        sessions: moka::sync::Cache<String, Arc<Claims>>,
        /// Nonces of links already exchanged, kept for as long as a link lives.
        spent: Arc<SpentLinks>,
    },
    Header {
        header: String,
        trusted_networks: Vec<Network>,
    },
}

/// What the access check concluded.
enum Verdict {
    Allow,
    /// Answered already (a redirect after a link exchange, a 401 page).
    Answered,
}

/// Where one request goes, decided in `request_filter` (or by the tunnel).
pub(super) enum Destination {
    Instance {
        upstream: Arc<Upstream>,
        /// Path and query for the workspace.
        path: String,
        /// Path routing (`/i-<id>/...`), as opposed to host routing (`i-<id>.<domain>`).
        prefixed: bool,
        /// Whether the request is a user's (not a keepalive): its body chunks and, after an
        /// upgrade, the client's WebSocket frames move the idle deadline.
        counts: bool,
    },
    Default(DefaultUrl),
}

#[derive(Default)]
pub struct RequestCtx {
    destination: Option<Destination>,
    address: Option<SocketAddr>,
    /// For a WebSocket: the client's frames, so that only its data frames count.
    frames: Option<FrameScanner>,
    /// Counts the WebSocket open once the workspace switched protocols, until it closes.
    socket: Option<OpenSocket>,
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The body of a page the proxy answers with itself. Never names an internal address.
pub(super) fn page_html(title: &str, message: &str, refresh_seconds: Option<u32>) -> String {
    let refresh = refresh_seconds
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{title}</title>\
         <style>body{{font-family:sans-serif;max-width:46em;margin:4em auto;color:#333}}\
         pre{{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:.85em}}</style>\
         </head><body><h1>{title}</h1><p>{message}</p></body></html>\n"
    )
}

/// The page for a workspace that did not answer in time.
pub(super) const TIMED_OUT: (&str, &str) = (
    "Workspace timed out",
    "Your workspace did not answer in time. Reload the page to try again.",
);

/// The page for a workspace that broke off or never answered.
pub(super) const UNREACHABLE: (&str, &str) = ("Workspace unreachable", "Your workspace is not answering right now. Reload the page in a moment; if it persists, ask the application for a new workspace.");

/// A small HTML page for the answers the proxy gives itself.
async fn page(
    session: &mut Session,
    status: u16,
    title: &str,
    message: &str,
    refresh_seconds: Option<u32>,
) -> Result<bool> {
    let body = page_html(title, message, refresh_seconds);
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header("content-type", "text/html; charset=utf-8")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    if let Some(s) = refresh_seconds {
        header.insert_header("retry-after", s.to_string())?;
    }
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(true)
}

/// A duration as people say it: `40 s`, `3 min 20 s`.
fn spoken(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s} s")
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// The page a user sees while their workspace starts: which workspace, how far it has come
/// and for how long, against the usual time; it reloads itself until the workspace answers
/// in its place.
async fn progress(
    session: &mut Session,
    upstream: &Upstream,
    usual: Option<Duration>,
) -> Result<bool> {
    let stage = upstream.stage;
    let steps = [
        (Stage::Launching, "Launching a machine"),
        (Stage::Starting, "Starting the workspace"),
        (Stage::Ready, "Ready"),
    ];
    let current = steps.iter().position(|(s, _)| *s == stage).unwrap_or(0);
    let list: String = steps
        .iter()
        .enumerate()
        .map(|(i, (_, label))| {
            let mark = match i.cmp(&current) {
                std::cmp::Ordering::Less => "&#10003;",
                std::cmp::Ordering::Equal => "&#8230;",
                std::cmp::Ordering::Greater => "&#183;",
            };
            format!("<li>{mark} {label}</li>")
        })
        .collect();
    let elapsed = Duration::from_millis(now_ms().saturating_sub(upstream.since_ms));
    let usual = match usual {
        Some(usual) => format!(" It usually takes about {}.", spoken(usual)),
        None => String::new(),
    };
    let message = format!(
        "Your <b class=\"purpose\">{purpose}</b> workspace <code class=\"instance\">{id}</code> has been starting for <span class=\"elapsed\">{elapsed}</span>.{usual} This page reloads itself and opens it as soon as it answers.</p><ol class=\"progress\">{list}</ol><p>",
        purpose = escape_html(&upstream.purpose.name),
        id = upstream.id,
        elapsed = spoken(elapsed),
    );
    page(
        session,
        503,
        "Your workspace is starting",
        &message,
        Some(2),
    )
    .await
}

async fn redirect(session: &mut Session, location: &str, set_cookie: Option<&str>) -> Result<bool> {
    let mut header = ResponseHeader::build(302, Some(4))?;
    header.insert_header("location", location)?;
    if let Some(cookie) = set_cookie {
        header.insert_header("set-cookie", cookie)?;
    }
    header.insert_header("content-length", "0")?;
    header.insert_header("cache-control", "no-store")?;
    session
        .write_response_header(Box::new(header), true)
        .await?;
    Ok(true)
}

/// The path, under an instance, that retries a failed start.
const RETRY_PATH: &str = "/.rstudio-pool/retry";
/// The path, under an instance, that resumes it when paused.
const RESUME_PATH: &str = "/.rstudio-pool/resume";
/// The proxy's own health check, outside every instance (a load balancer's target check).
pub const HEALTH_PATH: &str = "/.rstudio-pool/healthz";

/// The answer to [`HEALTH_PATH`]: the proxy is up and answers. It says whether the pool has
/// been rebuilt from the provider yet, but answers 200 either way: the proxy serves the
/// instances it knows meanwhile, and a load balancer must not take the only host away for it.
async fn health(session: &mut Session, recovered: bool) -> Result<bool> {
    let body = if recovered {
        "ok\n"
    } else {
        "ok (recovering)\n"
    };
    let mut header = ResponseHeader::build(200, Some(3))?;
    header.insert_header("content-type", "text/plain; charset=utf-8")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await?;
    Ok(true)
}

/// Whether a request comes from a page of the same origin, as far as the browser says: its
/// `Sec-Fetch-Site` is `same-origin` and its `Origin` names the host it was sent to, when
/// it sends them. A form on another site cannot make it (nor, with `SameSite=Lax`, carry
/// the session cookie).
fn same_origin(req: &RequestHeader) -> bool {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site").is_some_and(|site| site != "same-origin") {
        return false;
    }
    match (header("origin"), header("host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
    }
}

impl EdgeProxy {
    /// The page of a paused instance for its owner (access is checked before): their work is
    /// kept, and a button resumes it (a same-origin `POST`), then the progress page shows.
    async fn paused(
        &self,
        session: &mut Session,
        upstream: &Upstream,
        prefixed: bool,
        rest: &str,
    ) -> Result<bool> {
        let id = &upstream.id;
        let home = if prefixed {
            format!("/{id}/")
        } else {
            "/".to_owned()
        };
        let resume_path = if prefixed {
            format!("/{id}{RESUME_PATH}")
        } else {
            RESUME_PATH.to_owned()
        };
        if rest == RESUME_PATH && session.req_header().method == http::Method::POST {
            if !same_origin(session.req_header()) {
                return page(
                    session,
                    403,
                    "Not from this site",
                    "A workspace is resumed from its own page only.",
                    None,
                )
                .await;
            }
            let Some(user) = &upstream.owner else {
                return page(
                    session,
                    404,
                    "Workspace not found",
                    "This workspace is nobody's.",
                    None,
                )
                .await;
            };
            return match self.manager.request(user, &upstream.purpose.name).await {
                Ok(_) => redirect(session, &home, None).await,
                Err(e) => {
                    let message = format!("Your workspace could not be resumed: {e}");
                    page(session, 503, "Still paused", &escape_html(&message), None).await
                }
            };
        }
        let message = format!(
            "Nobody used it for a while, so it was stopped; your files are kept. Resume it to carry on where you left off.</p><form method=\"post\" action=\"{resume_path}\"><button type=\"submit\">Resume</button></form><p>"
        );
        page(
            session,
            503,
            "Your workspace is paused to save cost",
            &message,
            None,
        )
        .await
    }

    /// The page of an instance whose start failed: what happened, and a button that asks the
    /// pool for a new workspace and goes there.
    async fn failed(
        &self,
        session: &mut Session,
        id: &InstanceId,
        failure: &Failure,
        prefixed: bool,
        rest: &str,
        query: Option<&str>,
    ) -> Result<bool> {
        let owner = failure.owner.as_ref().map(|u| u.as_str());
        match self
            .check_access(session, id, owner, &failure.purpose, prefixed, rest, query)
            .await?
        {
            Verdict::Allow => {}
            Verdict::Answered => return Ok(true),
        }
        let retry_path = if prefixed {
            format!("/{id}{RETRY_PATH}")
        } else {
            RETRY_PATH.to_owned()
        };
        if rest == RETRY_PATH && session.req_header().method == http::Method::POST {
            let Some(user) = &failure.owner else {
                return page(
                    session,
                    404,
                    "Workspace not found",
                    "This workspace was nobody's.",
                    None,
                )
                .await;
            };
            return match self.manager.request(user, &failure.purpose).await {
                Ok(assignment) => {
                    let link = self.manager.user_link(&assignment.instance_id, user);
                    redirect(session, &link, None).await
                }
                Err(e) => {
                    let message = format!(
                        "A new workspace could not be had either: {e}. Try again in a minute."
                    );
                    page(
                        session,
                        503,
                        "No workspace yet",
                        &escape_html(&message),
                        None,
                    )
                    .await
                }
            };
        }
        // The first line says what happened; the rest (the end of its log) is shown as it is.
        let (what, log) = failure
            .reason
            .split_once('\n')
            .unwrap_or((failure.reason.as_str(), ""));
        let log = if log.is_empty() {
            String::new()
        } else {
            format!("</p><pre class=\"log\">{}</pre><p>", escape_html(log))
        };
        let message = format!(
            "Your <b>{purpose}</b> workspace could not start: {what}{log}If you ask for help, quote its id: <code class=\"instance\">{id}</code>.</p><form method=\"post\" action=\"{retry_path}\"><button type=\"submit\">Start a new workspace</button></form><p>",
            purpose = escape_html(&failure.purpose),
            what = escape_html(what),
        );
        page(
            session,
            503,
            "Your workspace could not start",
            &message,
            None,
        )
        .await
    }

    /// Whether the request may go to the instance as it is: the owner, plainly signed in.
    /// Pure (no answer written), so the WebSocket tunnel asks the same question. A request
    /// carrying a link is never "as it is": the link is exchanged first.
    pub(super) fn allowed<H: Head + ?Sized>(
        &self,
        req: &H,
        client_ip: Option<IpAddr>,
        id: &InstanceId,
        owner: Option<&str>,
        query: Option<&str>,
    ) -> bool {
        match &self.access {
            Access::Open => true,
            Access::Header {
                header,
                trusted_networks,
            } => {
                client_ip.is_some_and(|ip| trusted_networks.iter().any(|n| n.contains(ip)))
                    && req
                        .header(header.as_str())
                        .is_some_and(|user| Some(user) == owner)
            }
            Access::Token {
                signer, sessions, ..
            } => {
                if query.is_some_and(has_link_param) {
                    return false;
                }
                let now = now_ms();
                let presented = req.cookie(SESSION_COOKIE);
                let claims = presented.and_then(|token| match sessions.get(token) {
                    Some(claims) => Some(claims),
                    None => {
                        let claims =
                            Arc::new(signer.verify(token, Kind::Session, id.as_str(), now).ok()?);
                        sessions.insert(token.to_owned(), Arc::clone(&claims));
                        Some(claims)
                    }
                });
                // The cached claims are checked again: instance, owner and expiry.
                claims.is_some_and(|c| {
                    c.instance == id.as_str()
                        && Some(c.user.as_str()) == owner
                        && now < c.expires_ms
                })
            }
        }
    }

    /// Lets the owner in and nobody else, answering everyone else. In token mode a request
    /// carrying a link is answered with a session cookie and a redirect to the same address
    /// without the link.
    #[allow(clippy::too_many_arguments)]
    async fn check_access(
        &self,
        session: &mut Session,
        id: &InstanceId,
        owner: Option<&str>,
        purpose: &str,
        prefixed: bool,
        rest: &str,
        query: Option<&str>,
    ) -> Result<Verdict> {
        let client_ip = client_ip(session);
        if self.allowed(session.req_header(), client_ip, id, owner, query) {
            return Ok(Verdict::Allow);
        }
        let denied = "This link is not valid (links work once and expire after a few minutes), or you are not signed in to this workspace. Open your workspace from the application again.";
        match &self.access {
            Access::Open => Ok(Verdict::Allow),
            Access::Header {
                header,
                trusted_networks,
            } => {
                let trusted =
                    client_ip.is_some_and(|ip| trusted_networks.iter().any(|n| n.contains(ip)));
                let named = session.req_header().header(header).is_some();
                if trusted && named {
                    metrics().auth_refusal(Refusal::NotOwner);
                    page(
                        session,
                        403,
                        "Not your workspace",
                        "This workspace belongs to someone else.",
                        None,
                    )
                    .await?;
                } else {
                    metrics().auth_refusal(Refusal::Untrusted);
                    page(session, 401, "Sign in first", "Sign in through your organisation's login, then open your workspace from the application again.", None).await?;
                }
                Ok(Verdict::Answered)
            }
            Access::Token {
                signer,
                session_ttl_ms,
                spent,
                ..
            } => {
                let now = now_ms();
                if let Some((Some(token), remaining)) = query.map(take_link_param) {
                    let path = if prefixed {
                        format!("/{id}{rest}")
                    } else {
                        rest.to_owned()
                    };
                    let location = if remaining.is_empty() {
                        path
                    } else {
                        format!("{path}?{remaining}")
                    };
                    let valid = signer
                        .verify(token, Kind::Link, id.as_str(), now)
                        .ok()
                        .filter(|c| Some(c.user.as_str()) == owner);
                    let unspent = valid.is_some();
                    let claims = valid.filter(|c| spent.spend(c.nonce, c.expires_ms, now));
                    let Some(claims) = claims else {
                        metrics().link_exchange(if unspent {
                            LinkOutcome::Spent
                        } else {
                            LinkOutcome::Invalid
                        });
                        // The owner opening a spent link again (a second click in the
                        // application) is signed in already: on to the address without it.
                        if self.allowed(session.req_header(), client_ip, id, owner, None) {
                            redirect(session, &location, None).await?;
                        } else {
                            metrics().auth_refusal(Refusal::NoSession);
                            page(session, 401, "Link not valid", denied, None).await?;
                        }
                        return Ok(Verdict::Answered);
                    };
                    metrics().link_exchange(LinkOutcome::Ok);
                    if let Ok(user) = crate::core::ids::UserId::parse(&claims.user) {
                        audit::record(
                            Audit::LinkExchange,
                            Some(&user),
                            Some(id),
                            Some(purpose),
                            "a session was handed out",
                        );
                    }
                    let cookie_token = signer.sign(&Claims {
                        kind: Kind::Session,
                        expires_ms: now + session_ttl_ms,
                        nonce: rand::random(),
                        ..claims
                    });
                    let scope = if prefixed {
                        format!("/{id}/")
                    } else {
                        "/".to_owned()
                    };
                    let secure = if self.https { "; Secure" } else { "" };
                    let set_cookie = format!(
                        "{SESSION_COOKIE}={cookie_token}; Path={scope}; HttpOnly; SameSite=Lax{secure}"
                    );
                    redirect(session, &location, Some(&set_cookie)).await?;
                    return Ok(Verdict::Answered);
                }
                metrics().auth_refusal(Refusal::NoSession);
                page(
                    session,
                    401,
                    "Open your workspace from the application",
                    denied,
                    None,
                )
                .await?;
                Ok(Verdict::Answered)
            }
        }
    }
}

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: http::HeaderName = http::HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");

/// The headers the workspace gets from us rather than from the client, for one request:
/// the forwarding headers, its `Host` and root path, and cookies without our session.
/// Pingora's path ([`EdgeProxy::rewrite_request`]) and the edge's own
/// ([`super::forward`]) both apply it, so a workspace sees the same request either way.
pub(super) struct Forwarding<'a> {
    /// The client's `Host`, for `X-Forwarded-Host` and `X-Forwarded-Port`.
    host: Option<&'a [u8]>,
    /// The `Host` the workspace gets instead, when it is replaced.
    set_host: Option<&'a [u8]>,
    /// The root-path header, under path routing.
    root: Option<(&'a http::HeaderName, &'a [u8])>,
    ip: Option<IpAddr>,
    https: bool,
    /// Whether `Cookie` headers lose our session cookie (see [`Self::cookie`]).
    pub strip_cookie: bool,
}

impl Forwarding<'_> {
    /// Whether the client's header `name` is left out: ours to set (what a client claims
    /// about forwarding or RStudio's root is never passed on), or replaced.
    pub fn drops(&self, name: &str) -> bool {
        let starts = |prefix: &str| {
            name.len() >= prefix.len()
                && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        };
        !passable_name(name)
            || starts("x-forwarded-")
            || starts("x-rstudio-")
            || name.eq_ignore_ascii_case("forwarded")
            || (self.set_host.is_some() && name.eq_ignore_ascii_case("host"))
            || self
                .root
                .is_some_and(|(root, _)| name.eq_ignore_ascii_case(root.as_str()))
    }

    /// A `Cookie` header as the workspace gets it when [`Self::strip_cookie`]: without our
    /// session cookie; `None` drops the header (nothing left, or not text).
    pub fn cookie(&self, value: &[u8]) -> Option<String> {
        text(value).and_then(|c| without_cookie(c, SESSION_COOKIE))
    }

    /// Each header we set, in order.
    pub fn each(&self, mut set: impl FnMut(&http::HeaderName, &[u8])) {
        if let Some(host) = self.set_host {
            set(&http::header::HOST, host);
        }
        if let Some((name, value)) = self.root {
            set(name, value);
        }
        if let Some(ip) = self.ip {
            let mut buf = [0u8; 48];
            set(&X_FORWARDED_FOR, ip_text(ip, &mut buf));
        }
        let proto = if self.https { "https" } else { "http" };
        set(&X_FORWARDED_PROTO, proto.as_bytes());
        if let Some(host) = self.host {
            let port = forwarded_port(std::str::from_utf8(host).unwrap_or_default(), self.https);
            set(&X_FORWARDED_PORT, port.as_bytes());
            set(&X_FORWARDED_HOST, host);
        }
    }
}

/// A header value as text, read as `HeaderValue::to_str` reads it: visible ASCII and tabs.
pub(super) fn text(value: &[u8]) -> Option<&str> {
    // Without an early exit, so that the check runs a vector at a time: session cookies are
    // long, and this runs on every request.
    let visible = value.iter().fold(true, |ok, &b| {
        ok & ((b' '..=b'~').contains(&b) | (b == b'\t'))
    });
    if visible {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// An address as header text, IPv4 formatted by hand (`Display` costs more than the rest
/// of the header's handling).
fn ip_text(ip: IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{v6}");
            let len = cursor.position() as usize;
            return &buf[..len];
        }
    };
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    &buf[..len]
}

/// What the proxy's decisions read from a request head. Pingora's `RequestHeader` and the
/// edge's own parse ([`super::forward`]) both give it, so both paths decide alike.
pub(super) trait Head {
    fn method(&self) -> &str;
    /// The request target as sent.
    fn target(&self) -> &[u8];
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// The first `name` header, as [`text`].
    fn header(&self, name: &str) -> Option<&str>;
    /// Cookie `name`, from the first `Cookie` header that has it.
    fn cookie(&self, name: &str) -> Option<&str>;
}

impl Head for RequestHeader {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn target(&self) -> &[u8] {
        self.raw_path()
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| text(v.as_bytes()))
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| text(v.as_bytes()))
            .find_map(|h| cookie(h, name))
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(PingoraAddr::as_inet)
        .map(|a| a.ip())
}

/// Where a request for a ready instance goes, and whether it is a user's.
fn destination(
    upstream: Arc<Upstream>,
    method: &str,
    full_path: &str,
    rest: &str,
    query: Option<&str>,
    prefixed: bool,
    upgrade: bool,
) -> Destination {
    // Keepalives describe plain requests; on a socket, the client's data frames count.
    let counts = upgrade || is_user_activity(method, rest, &upstream.purpose.keepalive_paths);
    let strip = upstream.purpose.strip_prefix || !prefixed;
    let path = upstream_path(full_path, rest, query, strip);
    Destination::Instance {
        upstream,
        path,
        prefixed,
        counts,
    }
}

impl EdgeProxy {
    /// The common case, decided without answering and without allocating for the lookup: a
    /// request for a ready instance that the requester may reach. `None` sends the request
    /// down [`Self::answer`], which answers every other case. The WebSocket tunnel asks the
    /// same question, so both paths let in exactly the same requests.
    pub(super) fn admit<H: Head + ?Sized>(
        &self,
        req: &H,
        client_ip: Option<IpAddr>,
        upgrade: bool,
    ) -> Option<Destination> {
        // Checked on the target as sent: the parsed URI may already have resolved `..`.
        let raw = std::str::from_utf8(req.target()).ok()?;
        if has_dot_segment(raw.split('?').next().unwrap_or_default()) {
            return None;
        }
        let full_path = req.path();
        let query = req.query();
        let (id, rest, prefixed) = match self.host_routed(req) {
            Some(id) => (id, full_path, false),
            None => match parse(full_path) {
                Target::Instance { id, rest } => (id, rest, true),
                _ => return None,
            },
        };
        let upstream = self.manager.upstream(id)?;
        let owner = upstream.owner.as_ref().map(|u| u.as_str());
        if !upstream.ready || !self.allowed(req, client_ip, &upstream.id, owner, query) {
            return None;
        }
        Some(destination(
            upstream,
            req.method(),
            full_path,
            rest,
            query,
            prefixed,
            upgrade,
        ))
    }

    /// The instance a `Host` names, when routing by host is on.
    fn host_routed<'a, H: Head + ?Sized>(&self, req: &'a H) -> Option<&'a str> {
        let domain = self.config.host_domain.as_deref()?;
        host_instance(req.header("host")?, domain)
    }

    /// Sends an admitted request on its way.
    fn proceed(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        destination: Destination,
        upgrade: bool,
    ) {
        if let Destination::Instance {
            upstream,
            counts: true,
            ..
        } = &destination
        {
            upstream.touch(now_ms());
        }
        session.set_read_timeout(if upgrade {
            self.config.websocket_idle_timeout
        } else {
            self.config.downstream_read_timeout
        });
        ctx.frames = upgrade.then(FrameScanner::default);
        ctx.destination = Some(destination);
    }

    /// Every request [`Self::admit`] did not let straight through: bad addresses, the
    /// default URL, links to exchange, instances starting or failed, strangers.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        upgrade: bool,
    ) -> Result<bool> {
        let req = session.req_header();
        // Checked on the target as sent: the parsed URI may already have resolved `..`.
        let raw = String::from_utf8_lossy(req.raw_path());
        if has_dot_segment(raw.split('?').next().unwrap_or_default()) {
            return page(session, 400, "Bad request", "The address contains a `.` or `..` segment, which is not allowed. Open your workspace from the application again.", None).await;
        }
        let full_path = req.uri.path().to_owned();
        let query = req.uri.query().map(str::to_owned);
        let host_routed = self.host_routed(req).map(str::to_owned);
        let (id, rest, prefixed) = match (&host_routed, parse(&full_path)) {
            (Some(id), _) => (id.as_str(), full_path.as_str(), false),
            (None, Target::Instance { id, rest }) => (id, rest, true),
            (None, Target::InstanceRoot { id }) => {
                let location = match &query {
                    Some(q) => format!("/{id}/?{q}"),
                    None => format!("/{id}/"),
                };
                return redirect(session, &location, None).await;
            }
            (None, Target::Other) if full_path == HEALTH_PATH => {
                return health(session, self.manager.is_recovered()).await;
            }
            (None, Target::Other) => {
                return match &self.config.default_url {
                    Some(default) if default.https => {
                        let location = format!("{}{}", default.url, session.req_header().uri);
                        redirect(session, &location, None).await
                    }
                    Some(default) => {
                        ctx.destination = Some(Destination::Default(default.clone()));
                        Ok(false)
                    }
                    None => page(session, 404, "Not found", "There is nothing here. Open your workspace from the application that gave you its link.", None).await,
                };
            }
        };
        let not_found = "This workspace does not exist or has been shut down. Ask the application for a new one.";
        let Some(upstream) = self.manager.upstream(id) else {
            let Ok(id) = InstanceId::parse(id) else {
                return page(session, 404, "Workspace not found", not_found, None).await;
            };
            return match self.manager.failure(&id) {
                Some(failure) => {
                    self.failed(session, &id, &failure, prefixed, rest, query.as_deref())
                        .await
                }
                // Just started: the pool is still being rebuilt from the provider, and this
                // workspace may well be one of those it has not taken back yet.
                None if !self.manager.is_recovered() => {
                    page(
                        session,
                        503,
                        "Reconnecting to your workspace",
                        "The proxy has just restarted and is finding the workspaces again; your work is kept. This page reloads itself.",
                        Some(2),
                    )
                    .await
                }
                None => page(session, 404, "Workspace not found", not_found, None).await,
            };
        };
        let owner = upstream.owner.as_ref().map(|u| u.as_str());
        match self
            .check_access(
                session,
                &upstream.id,
                owner,
                &upstream.purpose.name,
                prefixed,
                rest,
                query.as_deref(),
            )
            .await?
        {
            Verdict::Allow => {}
            Verdict::Answered => return Ok(true),
        }
        if upstream.stage == Stage::Paused {
            return self.paused(session, &upstream, prefixed, rest).await;
        }
        if !upstream.ready {
            let usual = self.manager.usual_ready(&upstream.purpose.name);
            return progress(session, &upstream, usual).await;
        }
        let destination = destination(
            upstream,
            session.req_header().method.as_str(),
            &full_path,
            rest,
            query.as_deref(),
            prefixed,
            upgrade,
        );
        self.proceed(session, ctx, destination, upgrade);
        Ok(false)
    }

    /// The socket address a destination is reached at.
    pub(super) async fn address(&self, destination: Option<&Destination>) -> Result<SocketAddr> {
        Ok(match destination {
            Some(Destination::Instance { upstream, .. }) => {
                match (upstream.socket, upstream.address.as_deref()) {
                    // An IP address, parsed once per instance.
                    (Some(addr), _) => addr,
                    (None, Some(authority)) => self.resolve(authority).await?,
                    (None, None) => {
                        return Error::e_explain(
                            ErrorType::ConnectNoRoute,
                            "the workspace has no address yet",
                        )
                    }
                }
            }
            Some(Destination::Default(default)) => self.resolve(&default.authority).await?,
            None => return Error::e_explain(ErrorType::InternalError, "no destination chosen"),
        })
    }

    /// The request as the workspace receives it: its path, its `Host`, our forwarding
    /// headers in place of whatever the client claimed, and without our session cookie.
    /// This is Pingora's path (and the WebSocket tunnel's); [`super::forward`] writes the same
    /// request from its own parse, through the same [`Forwarding`] plan.
    ///
    /// Edited as plain `http` parts, not through `RequestHeader`'s setters: those parse every
    /// name again and keep a second map of header-name case, which cost more instructions
    /// than all the rest of our hooks (callgrind, BENCHMARKS.md). The workspace receives
    /// lower-case header names from this path; names are case-insensitive in HTTP/1.1.
    pub(super) fn rewrite_request(
        &self,
        request: &mut RequestHeader,
        client_ip: Option<IpAddr>,
        destination: Option<&Destination>,
    ) -> Result<()> {
        let uri = match destination {
            Some(Destination::Instance { path, .. }) => Some(path.parse().map_err(|_| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "the request path cannot be forwarded",
                )
            })?),
            _ => None,
        };
        let end_stream = request.send_end_stream();
        // Taken out by value (an empty header stands in until the edited one is put back):
        // cloning the parts instead cost 1.2k instructions more (callgrind).
        let mut parts: http::request::Parts = std::mem::replace(
            request,
            RequestHeader::from(http::Request::new(()).into_parts().0),
        )
        .into();
        let headers = &mut parts.headers;
        let host = headers.get(http::header::HOST).cloned();
        let plan = self.forwarding(
            host.as_ref().map(http::HeaderValue::as_bytes),
            client_ip,
            destination,
            headers
                .get_all(http::header::COOKIE)
                .iter()
                .map(http::HeaderValue::as_bytes),
        );
        let replaced: Vec<http::HeaderName> = headers
            .keys()
            .filter(|k| plan.drops(k.as_str()))
            .cloned()
            .collect();
        for name in replaced {
            headers.remove(name);
        }
        if plan.strip_cookie {
            let kept: Vec<http::HeaderValue> = headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| plan.cookie(v.as_bytes()))
                .filter_map(|c| http::HeaderValue::from_bytes(c.as_bytes()).ok())
                .collect();
            headers.remove(http::header::COOKIE);
            for value in kept {
                headers.append(http::header::COOKIE, value);
            }
        }
        let mut invalid = false;
        headers.reserve(6);
        plan.each(|name, value| match http::HeaderValue::from_bytes(value) {
            Ok(value) => {
                headers.append(name.clone(), value);
            }
            Err(_) => invalid = true,
        });
        if invalid {
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "a forwarding header (DEFAULT_URL's host?) is not a valid header value",
            );
        }
        if let Some(uri) = uri {
            parts.uri = uri;
        }
        *request = RequestHeader::from(parts);
        if let Some(end_stream) = end_stream {
            request.set_send_end_stream(end_stream);
        }
        Ok(())
    }

    /// What the workspace gets from us rather than from the client, for one request.
    /// `host` is the client's `Host`; `cookies` its `Cookie` headers.
    pub(super) fn forwarding<'a, 'c>(
        &'a self,
        host: Option<&'a [u8]>,
        client_ip: Option<IpAddr>,
        destination: Option<&'a Destination>,
        mut cookies: impl Iterator<Item = &'c [u8]>,
    ) -> Forwarding<'a> {
        let (set_host, root) = match destination {
            Some(Destination::Instance {
                upstream, prefixed, ..
            }) => (
                upstream
                    .host_header
                    .as_ref()
                    .map(http::HeaderValue::as_bytes),
                upstream
                    .root_path
                    .as_ref()
                    .filter(|_| *prefixed)
                    .map(|(name, value)| (name, value.as_bytes())),
            ),
            Some(Destination::Default(default)) => (Some(default.host_header.as_bytes()), None),
            None => (None, None),
        };
        // A request let in by its session cookie has one: no need to look for it.
        let signed_in = matches!(self.access, Access::Token { .. })
            && matches!(destination, Some(Destination::Instance { .. }));
        let strip_cookie =
            signed_in || cookies.any(|v| text(v).and_then(|c| cookie(c, SESSION_COOKIE)).is_some());
        Forwarding {
            host: host.filter(|h| !h.is_empty()),
            set_host,
            root,
            ip: client_ip,
            https: self.https,
            strip_cookie,
        }
    }

    /// The workspace's answer as the user receives it: redirects and cookies brought back
    /// under the instance's prefix.
    pub(super) fn rewrite_response(
        &self,
        response: &mut ResponseHeader,
        destination: Option<&Destination>,
        address: Option<SocketAddr>,
    ) -> Result<()> {
        let Some(Destination::Instance {
            upstream, prefixed, ..
        }) = destination
        else {
            return Ok(());
        };
        let id = &upstream.id;
        if let Some(location) = response
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            let addr = address.map(|a| a.to_string()).unwrap_or_default();
            let hosts = [
                upstream.address.as_deref().unwrap_or_default(),
                addr.as_str(),
            ];
            let rewritten = if *prefixed {
                rewrite_location(location, id.as_str(), &hosts)
            } else {
                strip_upstream_origin(location, &hosts)
            };
            if let Some(rewritten) = rewritten {
                response.insert_header(http::header::LOCATION, rewritten)?;
            }
        }
        if !*prefixed {
            // Its own origin: the workspace's cookies need no scoping.
            return Ok(());
        }
        let cookies: Vec<http::HeaderValue> = response
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        // Read as text, as a browser reads them; one that is not text is not a cookie we can
        // scope, and is dropped rather than passed on unscoped.
        let scope = |c: &http::HeaderValue| match c.to_str() {
            Ok(text) => scope_set_cookie(text, id.as_str()),
            Err(_) => CookieScope::Drop,
        };
        if cookies
            .iter()
            .any(|c| !matches!(scope(c), CookieScope::Keep))
        {
            response.remove_header(&http::header::SET_COOKIE);
            for cookie in cookies {
                match scope(&cookie) {
                    CookieScope::Keep => {
                        response.append_header(http::header::SET_COOKIE, cookie)?
                    }
                    CookieScope::Scoped(scoped) => {
                        response.append_header(http::header::SET_COOKIE, scoped)?
                    }
                    CookieScope::Drop => {
                        log::debug!("{id}: dropped a Set-Cookie that is not a cookie");
                        continue;
                    }
                };
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let upgrade = session.is_upgrade_req();
        if let Some(destination) = self.admit(session.req_header(), client_ip(session), upgrade) {
            self.proceed(session, ctx, destination, upgrade);
            return Ok(false);
        }
        self.answer(session, ctx, upgrade).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let addr = self.address(ctx.destination.as_ref()).await?;
        ctx.address = Some(addr);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.config.upstream_connect_timeout);
        // No read timeout: RStudio's long poll holds a request for about 50 s, and sockets
        // stay open for hours; the downstream side bounds silence instead.
        peer.options.read_timeout = None;
        // No idle timeout on pooled connections either: a timer per request cost 2,000
        // instructions (callgrind). Workspaces close idle keep-alive connections themselves,
        // and Pingora notices a pooled connection closing.
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.rewrite_request(request, client_ip(session), ctx.destination.as_ref())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Request bodies and, after an upgrade, the client's WebSocket frames, of which only
        // data frames are the user's (a browser answers pings on its own).
        if let Some(Destination::Instance {
            upstream,
            counts: true,
            ..
        }) = &ctx.destination
        {
            let Some(body) = body.as_ref().filter(|b| !b.is_empty()) else {
                return Ok(());
            };
            let counts = match ctx.frames.as_mut() {
                Some(frames) => frames.feed(body),
                None => true,
            };
            if counts {
                upstream.touch(now_ms());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS && ctx.frames.is_some() {
            ctx.socket = Some(OpenSocket::open());
        }
        self.rewrite_response(response, ctx.destination.as_ref(), ctx.address)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // Requests this path answered: proxied to a workspace (or the default URL) by
        // Pingora, or one of our pages. A request that got no answer is not counted.
        let Some(status) = session.response_written().map(|r| r.status.as_u16()) else {
            return;
        };
        let path = if ctx.address.is_some() {
            ProxyPath::Pingora
        } else {
            ProxyPath::Page
        };
        metrics().proxied(path, status);
        ctx.socket = None;
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if matches!(
            e.etype(),
            ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError
                | ErrorType::ConnectProxyFailure
        ) {
            metrics().upstream_connect_errors.inc();
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            if code >= 500 {
                let (title, message) = if code == 504 { TIMED_OUT } else { UNREACHABLE };
                let _ = page(session, code, title, message, None).await;
            } else {
                let _ = session.respond_error(code).await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// `text` reads a header value exactly as `HeaderValue::to_str` does, on both paths.
        #[test]
        fn header_text_is_read_as_http_reads_it(value in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            if let Ok(header) = http::HeaderValue::from_bytes(&value) {
                proptest::prop_assert_eq!(text(&value), header.to_str().ok());
            }
        }
    }

    #[test]
    fn addresses_become_header_values() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.5.99",
            "127.0.0.1",
            "::1",
            "fd00::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip, &mut [0; 48]), ip.to_string().as_bytes());
        }
    }
}
