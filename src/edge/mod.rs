//! The edge listener's connection handler. [`Edge`] reads each request head of a connection
//! itself, plain TCP or HTTP/1.1 over TLS alike (after the handshake a TLS connection is a
//! byte stream like any other; HTTP/2, chosen by ALPN, is Pingora's), and decides, through
//! [`EdgeProxy::admit`], where it goes:
//!
//! - a plain request that the proxy would let straight through (a ready instance, its owner
//!   signed in) and that is simple to carry (HTTP/1.1, a body of known, small length) is
//!   forwarded by [`forward`] over [`crate::http1`]: one parse, one write each way, no
//!   per-request allocation beyond the rewritten path;
//! - an admitted WebSocket handshake becomes a tunnel ([`tunnel`]);
//! - everything else (pages, link exchanges, strangers, chunked or large uploads, HTTP/1.0,
//!   `Expect`, ...) is put back in front of the stream and handed to Pingora's `HttpProxy`
//!   for that one request, which answers it with the proxy's hooks; the connection comes
//!   back here afterwards.
//!
//! Why: Pingora's per-request machinery cost about 90,000 instructions a request where nginx
//! spends 19,000 (callgrind, BENCHMARKS.md); the common request needs little of it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::TlsStream;
use pingora_core::protocols::{GetSocketDigest, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::AsyncWriteExt;

pub mod forward;
pub mod proxy;
pub mod redirect;
mod spent;
pub mod tunnel;

use forward::{Done, Forward};
use proxy::{Destination, EdgeProxy};
use tunnel::Handshake;

use crate::http1::client::{ClientStream, Rewound};
use crate::http1::conn::{Connection, Limits};
use crate::http1::MAX_HEADERS;
use crate::provider::process::now_ms;

/// The edge proxy's connection handler: our own forwarding and WebSocket tunnels, and
/// Pingora for the rest.
pub struct Edge {
    proxy: EdgeProxy,
    http: Arc<HttpProxy<EdgeProxy>>,
    /// Client connections open now, against `proxy.max_connections`.
    open: AtomicUsize,
    /// When the limit was last said in the log (ms since the epoch).
    warned_at: AtomicU64,
}

/// One client connection counted in [`Edge::open`] while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer to a connection over the limit: no request is read.
const AT_LIMIT: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 60\r\nretry-after: 5\r\nconnection: close\r\n\r\n\
The proxy has all the connections it takes. Try again soon.\n";

/// What to do with the request at the front of a connection.
enum Plan {
    Forward(Forward),
    Tunnel(Handshake, Destination),
    Pingora,
}

impl Edge {
    pub fn new(proxy: EdgeProxy, http: HttpProxy<EdgeProxy>) -> Self {
        Self {
            proxy,
            http: Arc::new(http),
            open: AtomicUsize::new(0),
            warned_at: AtomicU64::new(0),
        }
    }

    /// Counts a new client connection: `None` when `proxy.max_connections` are open already
    /// (said in the log at most once a minute).
    fn admit_connection(&self) -> Option<Counted<'_>> {
        let max = self.proxy.config().max_connections;
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(&self.open);
        if open < max {
            return Some(counted);
        }
        let now = now_ms();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "the edge has {max} client connections open, its proxy.max_connections: \
                 new ones are answered 503 until some close (raise it, and the open-file \
                 limit with it, if this is real traffic)"
            );
        }
        None
    }

    async fn serve<C: ClientStream + GetSocketDigest>(
        self: &Arc<Self>,
        client: Box<C>,
        shutdown: &ShutdownWatch,
    ) {
        let client_ip = client
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut conn = Connection::new(client, client_ip);
        let mut first = true;
        loop {
            let Some(plan) = self.next_request(&mut conn, first, shutdown).await else {
                return;
            };
            first = false;
            match plan {
                Plan::Forward(job) => match forward::forward(&mut conn, &self.proxy, job).await {
                    Done::KeepAlive if !*shutdown.borrow() => continue,
                    Done::KeepAlive | Done::Close => return,
                    Done::Pingora => {}
                },
                Plan::Tunnel(handshake, destination) => {
                    match tunnel::tunnel(&self.proxy, &mut conn, handshake, destination).await {
                        Done::Pingora => {}
                        Done::KeepAlive | Done::Close => return,
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
    async fn next_request<C: ClientStream>(
        &self,
        conn: &mut Connection<C>,
        first: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<Plan> {
        let config = self.proxy.config();
        let limits = Limits {
            head: config.request_head_timeout,
            read: config.downstream_read_timeout,
        };
        conn.next_head(
            first,
            shutdown,
            limits,
            |conn| self.plan(conn),
            Plan::Pingora,
        )
        .await
    }

    /// Plans the request whose head is at the front of the connection's input; `None` while
    /// the head is incomplete.
    fn plan<C: ClientStream>(&self, conn: &mut Connection<C>) -> Option<Plan> {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(&conn.input, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            // Malformed, or too many headers: Pingora answers it.
            Err(_) => return Some(Plan::Pingora),
        };
        if !self.proxy.config().own_forwarding {
            return Some(Plan::Pingora);
        }
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
        let Some(_counted) = self.admit_connection() else {
            let mut stream = stream;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                stream.write_all(AT_LIMIT).await?;
                stream.flush().await
            })
            .await;
            return None;
        };
        // HTTP/2 (chosen by ALPN) and transports other than TCP and TLS: Pingora alone.
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return self.http.process_new(stream, shutdown).await;
        }
        if stream.as_any().is::<L4Stream>() {
            let client: Box<L4Stream> = stream.into_any().downcast().ok()?;
            self.serve(client, shutdown).await;
        } else if stream.as_any().is::<TlsStream<L4Stream>>() {
            // After the handshake, a TLS connection is a byte stream like any other.
            let tls: Box<TlsStream<L4Stream>> = stream.into_any().downcast().ok()?;
            self.serve(Box::new(Rewound::new(*tls)), shutdown).await;
        } else {
            return self.http.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.http).await
    }
}
