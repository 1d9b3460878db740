//! The edge proxy as a Pingora `ProxyHttp`: `/i-<instanceId>/...` to the owner's workspace,
//! HTTP and WebSocket alike, with the rewriting RStudio needs. The hooks stay thin: route
//! parsing, path and header rewriting and the activity rule are the pure functions of
//! [`crate::core::route`]; instance lookups are the manager's lock-free cache.
//!
//! **Architecture invariant:** this is the only module that knows Pingora's proxy phases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use super::manager::{PoolManager, Upstream};
use crate::config::{DefaultUrl, ProxyConfig};
use crate::core::ids::InstanceId;
use crate::core::route::{
    forwarded_port, is_user_activity, parse, rewrite_location, rewrite_set_cookie, upstream_path,
    Target,
};
use crate::provider::process::now_ms;

pub struct EdgeProxy {
    manager: Arc<PoolManager>,
    config: ProxyConfig,
    /// The scheme users reach us with, for `X-Forwarded-Proto`.
    https: bool,
    /// Host names resolved off the request path (DEFAULT_URL, EC2 DNS names), with a TTL.
    resolved: moka::sync::Cache<String, SocketAddr>,
}

impl EdgeProxy {
    pub fn new(manager: Arc<PoolManager>, config: ProxyConfig) -> Self {
        let https = config.public_url.starts_with("https://");
        Self {
            manager,
            config,
            https,
            resolved: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
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

/// Where one request goes, decided in `request_filter`.
enum Destination {
    Instance {
        id: InstanceId,
        upstream: Arc<Upstream>,
        path: String,
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
}

/// A small HTML page for the answers the proxy gives itself. Never names an internal address.
async fn page(
    session: &mut Session,
    status: u16,
    title: &str,
    message: &str,
    refresh_seconds: Option<u32>,
) -> Result<bool> {
    let refresh = refresh_seconds
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{title}</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;color:#333}}</style>\
         </head><body><h1>{title}</h1><p>{message}</p></body></html>\n"
    );
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

async fn redirect(session: &mut Session, location: &str) -> Result<bool> {
    let mut header = ResponseHeader::build(302, Some(3))?;
    header.insert_header("location", location)?;
    header.insert_header("content-length", "0")?;
    header.insert_header("cache-control", "no-store")?;
    session
        .write_response_header(Box::new(header), true)
        .await?;
    Ok(true)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let uri = &session.req_header().uri;
        let full_path = uri.path().to_owned();
        let query = uri.query().map(str::to_owned);
        match parse(&full_path) {
            Target::Other => match &self.config.default_url {
                Some(default) if default.https => {
                    let location = format!("{}{}", default.url, uri);
                    redirect(session, &location).await
                }
                Some(default) => {
                    ctx.destination = Some(Destination::Default(default.clone()));
                    Ok(false)
                }
                None => page(session, 404, "Not found", "There is nothing here. Open your workspace from the application that gave you its link.", None).await,
            },
            Target::InstanceRoot { id } => {
                let location = match &query {
                    Some(q) => format!("/{id}/?{q}"),
                    None => format!("/{id}/"),
                };
                redirect(session, &location).await
            }
            Target::Instance { id, rest } => {
                let Some(upstream) = InstanceId::parse(id).ok().and_then(|id| self.manager.upstream(&id)) else {
                    return page(session, 404, "Workspace not found", "This workspace does not exist or has been shut down. Ask the application for a new one.", None).await;
                };
                if !upstream.ready {
                    return page(session, 503, "Your workspace is starting", "Your workspace is starting. This page reloads itself until it is ready.", Some(2)).await;
                }
                let purpose = &upstream.purpose;
                let counts = is_user_activity(rest, &purpose.keepalive_paths);
                if counts {
                    upstream.touch(now_ms());
                }
                let path = upstream_path(&full_path, rest, query.as_deref(), purpose.strip_prefix);
                let timeout = if session.is_upgrade_req() {
                    self.config.websocket_idle_timeout
                } else {
                    self.config.downstream_read_timeout
                };
                session.set_read_timeout(timeout);
                ctx.destination = Some(Destination::Instance {
                    id: InstanceId::parse(id).expect("parsed above"),
                    upstream,
                    path,
                    counts,
                });
                Ok(false)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let authority = match &ctx.destination {
            Some(Destination::Instance { upstream, .. }) => {
                upstream.address.as_deref().ok_or_else(|| {
                    Error::explain(
                        ErrorType::ConnectNoRoute,
                        "the workspace has no address yet",
                    )
                })?
            }
            Some(Destination::Default(default)) => default.authority.as_str(),
            None => return Error::e_explain(ErrorType::InternalError, "no destination chosen"),
        };
        let addr = self.resolve(authority).await?;
        ctx.address = Some(addr);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.config.upstream_connect_timeout);
        // No read timeout: RStudio's long poll holds a request for about 50 s, and sockets
        // stay open for hours; the downstream side bounds silence instead.
        peer.options.read_timeout = None;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let host = session
            .req_header()
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let client_ip = session
            .client_addr()
            .and_then(PingoraAddr::as_inet)
            .map(|a| a.ip().to_string());
        // What the client claims about forwarding or RStudio's root is never passed on: we
        // set our own below.
        let spoofable: Vec<http::HeaderName> = request
            .headers
            .keys()
            .filter(|k| {
                k.as_str().starts_with("x-forwarded-") || k.as_str().starts_with("x-rstudio-")
            })
            .cloned()
            .collect();
        for name in spoofable {
            request.remove_header(&name);
        }
        request.remove_header("forwarded");
        match &ctx.destination {
            Some(Destination::Instance {
                id, upstream, path, ..
            }) => {
                request.set_uri(path.parse().map_err(|_| {
                    Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "the request path cannot be forwarded",
                    )
                })?);
                if let Some(address) = &upstream.address {
                    request.insert_header(http::header::HOST, address.as_str())?;
                }
                if upstream.purpose.strip_prefix {
                    request.insert_header("x-rstudio-root-path", format!("/{id}"))?;
                }
            }
            Some(Destination::Default(default)) => {
                request.insert_header(http::header::HOST, default.host_header.as_str())?;
            }
            None => {}
        }
        if let Some(ip) = client_ip {
            request.insert_header("x-forwarded-for", ip)?;
        }
        let proto = if self.https { "https" } else { "http" };
        request.insert_header("x-forwarded-proto", proto)?;
        if !host.is_empty() {
            request.insert_header("x-forwarded-port", forwarded_port(&host, self.https))?;
            request.insert_header("x-forwarded-host", host)?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Request bodies and, after an upgrade, the client's WebSocket frames.
        if let Some(Destination::Instance {
            upstream,
            counts: true,
            ..
        }) = &ctx.destination
        {
            if body.as_ref().is_some_and(|b| !b.is_empty()) {
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
        let Some(Destination::Instance { id, upstream, .. }) = &ctx.destination else {
            return Ok(());
        };
        if let Some(location) = response
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            let addr = ctx.address.map(|a| a.to_string()).unwrap_or_default();
            let hosts = [
                upstream.address.as_deref().unwrap_or_default(),
                addr.as_str(),
            ];
            if let Some(rewritten) = rewrite_location(location, id.as_str(), &hosts) {
                response.insert_header(http::header::LOCATION, rewritten)?;
            }
        }
        let cookies: Vec<String> = response
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        if cookies
            .iter()
            .any(|c| rewrite_set_cookie(c, id.as_str()).is_some())
        {
            response.remove_header(&http::header::SET_COOKIE);
            for cookie in cookies {
                let scoped = rewrite_set_cookie(&cookie, id.as_str()).unwrap_or(cookie);
                response.append_header(http::header::SET_COOKIE, scoped)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
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
                let (title, message) = if code == 504 {
                    (
                        "Workspace timed out",
                        "Your workspace did not answer in time. Reload the page to try again.",
                    )
                } else {
                    ("Workspace unreachable", "Your workspace is not answering right now. Reload the page in a moment; if it persists, ask the application for a new workspace.")
                };
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
