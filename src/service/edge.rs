//! The edge listener's connection handler. [`Edge`] reads each request head of a plain-TCP
//! connection itself and decides, through [`EdgeProxy::admit`], where it goes:
//!
//! - a plain request that the proxy would let straight through (a ready instance, its owner
//!   signed in) and that is simple to carry (HTTP/1.1, a body of known, small length) is
//!   forwarded by [`super::forward`]: one parse, one write each way, no per-request
//!   allocation beyond the rewritten path;
//! - an admitted WebSocket handshake becomes a tunnel ([`super::tunnel`]);
//! - everything else (pages, link exchanges, strangers, chunked or large uploads, HTTP/1.0,
//!   `Expect`, ...) is put back in front of the stream and handed to Pingora's `HttpProxy`
//!   for that one request, which answers it with the proxy's hooks; the connection comes
//!   back here afterwards.
//!
//! Why: Pingora's per-request machinery cost about 90,000 instructions a request where nginx
//! spends 19,000 (callgrind, BENCHMARKS.md); the common request needs little of it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use super::forward::{self, Done, Forward};
use super::proxy::{Destination, EdgeProxy};
use super::tunnel::{self, Handshake};

/// A request head longer than this is left to Pingora (which refuses it).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed in a head; a request with more is left to Pingora.
pub(super) const MAX_HEADERS: usize = 128;
/// How long a kept-alive connection may wait for its next request: Pingora's own default.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a kept-alive connection waits before it gives its buffers back.
pub(super) const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// The edge proxy's connection handler: our own forwarding and WebSocket tunnels, and
/// Pingora for the rest.
pub struct Edge {
    proxy: EdgeProxy,
    http: Arc<HttpProxy<EdgeProxy>>,
}

/// What to do with the request at the front of a connection.
pub(super) enum Plan {
    Forward(Forward),
    Tunnel(Handshake, Destination),
    Pingora,
}

impl Edge {
    pub fn new(proxy: EdgeProxy, http: HttpProxy<EdgeProxy>) -> Self {
        Self {
            proxy,
            http: Arc::new(http),
        }
    }

    async fn serve(self: &Arc<Self>, client: Box<L4Stream>, shutdown: &ShutdownWatch) {
        let client_ip = client
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut conn = forward::Connection::new(client, client_ip);
        let mut first = true;
        loop {
            let Some(plan) = self.next_request(&mut conn, first, shutdown).await else {
                return;
            };
            first = false;
            match plan {
                Plan::Forward(job) => match conn.forward(&self.proxy, job).await {
                    Done::KeepAlive if !*shutdown.borrow() => continue,
                    Done::KeepAlive | Done::Close => return,
                    Done::Pingora => {}
                },
                Plan::Tunnel(handshake, destination) => {
                    if tunnel::tunnel(&self.proxy, &mut conn, handshake, destination).await {
                        return;
                    }
                }
                Plan::Pingora => {}
            }
            // Pingora answers this one request, from the bytes we read.
            if !conn.through_pingora(&self.http, shutdown).await {
                return;
            }
        }
    }

    /// Reads until the connection holds a whole request head, and plans it. `None`: the
    /// connection is finished.
    async fn next_request(
        &self,
        conn: &mut forward::Connection,
        first: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<Plan> {
        let limit = self.proxy.config().downstream_read_timeout;
        conn.next_head(
            first,
            shutdown,
            limit,
            |conn| self.plan(conn),
            Plan::Pingora,
        )
        .await
    }

    /// Plans the request whose head is at the front of the connection's input; `None` while
    /// the head is incomplete.
    fn plan(&self, conn: &mut forward::Connection) -> Option<Plan> {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(&conn.input, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            // Malformed, or too many headers: Pingora answers it.
            Err(_) => return Some(Plan::Pingora),
        };
        let client_ip: Option<IpAddr> = conn.client_ip;
        if let Some(handshake) = tunnel::handshake(&req, len) {
            return Some(
                match self.proxy.admit(&*handshake.request, client_ip, true) {
                    Some(destination) => Plan::Tunnel(handshake, destination),
                    None => Plan::Pingora,
                },
            );
        }
        Some(
            match forward::plan(&self.proxy, &req, len, client_ip, &mut conn.out) {
                Some(job) => Plan::Forward(job),
                None => Plan::Pingora,
            },
        )
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // TLS or other transports: Pingora alone.
        if !stream.as_any().is::<L4Stream>() {
            return self.http.process_new(stream, shutdown).await;
        }
        let client: Box<L4Stream> = stream.into_any().downcast().ok()?;
        self.serve(client, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.http).await
    }
}
