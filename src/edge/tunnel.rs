//! WebSockets outside Pingora's HTTP session. When the edge ([`super::edge`]) reads a
//! WebSocket handshake that [`EdgeProxy::admit`] lets straight through (a ready instance, its
//! owner signed in), it becomes a tunnel: the handshake is rewritten by the same methods the
//! Pingora hooks use, and after the workspace's `101` the two sockets are joined by a relay
//! that holds no buffer while the socket is idle. A handshake the workspace does not answer
//! with `101` gets the workspace's answer, once; nothing the client sent after its head
//! reaches the workspace before a `101`.
//!
//! Why: Pingora 0.9.1 keeps two 64 KiB body buffers and a retry buffer for every upgraded
//! connection (about 60 KB of memory per idle socket, not configurable), and tears an upgraded
//! connection down when a fast workspace answers before it has read the empty request body
//! (cloudflare/pingora#946).

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::forward::{failed, rewrite_head, Done};
use super::proxy::{Destination, EdgeProxy};
use crate::core::wsframe::FrameScanner;
use crate::http1::client::ClientStream;
use crate::http1::conn::{Connection, Exchange, Outcome};
use crate::http1::MAX_HEADERS;
use crate::metrics::{OpenSocket, ProxyPath};
use crate::provider::process::now_ms;

/// What the relay reads at once, on the stack: an idle socket holds no buffer.
const CHUNK: usize = 16 * 1024;

/// A WebSocket handshake read by the edge.
pub(super) struct Handshake {
    pub request: Box<RequestHeader>,
    /// The head's length in bytes.
    len: usize,
}

/// The handshake in a parsed request head, when it is one we tunnel: `GET`, HTTP/1.1,
/// `Upgrade: websocket` and `Connection: upgrade`.
pub(super) fn handshake(req: &httparse::Request<'_, '_>, len: usize) -> Option<Handshake> {
    let (Some("GET"), Some(1), Some(path)) = (req.method, req.version, req.path) else {
        return None;
    };
    let has = |name: &str, token: &str| {
        req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case(name)
                && std::str::from_utf8(h.value)
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has("upgrade", "websocket") || !has("connection", "upgrade") {
        return None;
    }
    let mut request =
        RequestHeader::build_no_case("GET", path.as_bytes(), Some(req.headers.len())).ok()?;
    for h in req.headers.iter() {
        request.append_header(h.name.to_owned(), h.value).ok()?;
    }
    Some(Handshake {
        request: Box::new(request),
        len,
    })
}

/// Carries an admitted handshake to the workspace and, on its `101`, relays the socket until
/// either side closes it or it has been silent for the WebSocket idle timeout. Only the
/// rewritten head is sent before the `101`; what the client sent after it (frames it should
/// have held back) follows the `101`. A refusal (any other answer) is passed back once, like
/// any answer, and the connection closes. [`Done::Pingora`] only when nothing was sent.
pub(super) async fn tunnel<C: ClientStream>(
    proxy: &EdgeProxy,
    conn: &mut Connection<C>,
    handshake: Handshake,
    destination: Destination,
) -> Done {
    let config = proxy.config();
    let Handshake { mut request, len } = handshake;
    let Ok(addr) = proxy.address(Some(&destination)).await else {
        return Done::Pingora;
    };
    if proxy
        .rewrite_request(&mut request, conn.client_ip, Some(&destination))
        .is_err()
    {
        return Done::Pingora;
    }
    let Destination::Instance {
        upstream,
        counts,
        prefixed,
        ..
    } = &destination
    else {
        return Done::Pingora;
    };
    conn.out.clear();
    write_request_head(&request, &mut conn.out);
    drop(request);
    let job = Exchange {
        addr,
        connect_timeout: config.upstream_connect_timeout,
        head_only: false,
        retry: false,
        upgrade: true,
    };
    let outcome = conn
        .exchange(&job, |answer, head| {
            rewrite_head(proxy, &destination, *prefixed, addr, answer, head)
        })
        .await;
    super::forward::count(ProxyPath::Tunnel, conn.status, &outcome);
    let mut server = match outcome {
        Outcome::Upgraded(server) => server,
        Outcome::KeepAlive | Outcome::Close => return Done::Close,
        Outcome::Failed(status, failure) => {
            failed(conn, &upstream.id, status, failure).await;
            return Done::Close;
        }
    };
    // Only the client's data frames are the user's: a browser answers pings on its own.
    let mut frames = FrameScanner::default();
    let early = &conn.input[len.min(conn.input.len())..];
    if !early.is_empty() {
        frames.feed(early);
        if server.write_all(early).await.is_err() {
            return Done::Close;
        }
    }
    // The connection's buffers are not needed again: an open socket holds none.
    conn.release();
    let Some(client) = conn.client_stream() else {
        return Done::Close;
    };
    log::debug!("WebSocket tunnel open to {}", upstream.id);
    let _open = OpenSocket::open();
    if *counts {
        upstream.touch(now_ms());
    }
    let result = relay(
        client,
        &mut server,
        config.websocket_idle_timeout,
        |bytes| {
            if *counts && frames.feed(bytes) {
                upstream.touch(now_ms());
            }
        },
    )
    .await;
    log::debug!("WebSocket tunnel to {} closed: {result:?}", upstream.id);
    Done::Close
}

/// The workspace's response head: `None` when it is not HTTP, `Some(None)` when incomplete.
pub(super) fn response_head(buf: &[u8]) -> Option<Option<(ResponseHeader, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf).ok()? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Some(None),
    };
    let mut response = ResponseHeader::build_no_case(res.code?, Some(res.headers.len())).ok()?;
    for h in res.headers.iter() {
        response.append_header(h.name.to_owned(), h.value).ok()?;
    }
    Some(Some((response, len)))
}

fn write_request_head(request: &RequestHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_headers(&request.headers, out);
}

pub(super) fn write_response_head(response: &ResponseHeader, out: &mut Vec<u8>) {
    let status = response.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(&response.headers, out);
}

fn write_headers(headers: &http::HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Joins the two sockets until both directions have ended, either fails, or nothing has
/// passed either way for `idle`. `on_client_data` runs whenever the client sends something.
async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    server: &mut TcpStream,
    idle: Option<Duration>,
    mut on_client_bytes: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut up = Pump::default();
    let mut down = Pump::default();
    let mut last = Instant::now();
    let mut timer = idle.map(|d| Box::pin(tokio::time::sleep(d)));
    poll_fn(|cx| {
        let (mut sent, mut received) = (false, false);
        let up_state = up.poll(cx, client, server, &mut sent, &mut on_client_bytes);
        let down_state = down.poll(cx, server, client, &mut received, &mut |_| {});
        match (up_state, down_state) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(())),
            _ => {}
        }
        if sent || received {
            last = Instant::now();
        }
        if let (Some(timer), Some(idle)) = (timer.as_mut(), idle) {
            // The timer is moved only when it fires, not on every message.
            while timer.as_mut().poll(cx).is_ready() {
                let due = last + idle;
                if due <= Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the WebSocket was silent for its idle timeout",
                    )));
                }
                timer.as_mut().reset(due);
            }
        }
        Poll::Pending
    })
    .await
}

/// One direction of a relay. Reads into a stack buffer and writes straight on; only what the
/// other side cannot take yet is kept, on the heap, until it can.
#[derive(Default)]
struct Pump {
    pending: Vec<u8>,
    flush: bool,
    eof: bool,
    done: bool,
}

impl Pump {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        moved: &mut bool,
        seen: &mut impl FnMut(&[u8]),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.drain(..n);
                if self.pending.is_empty() {
                    self.pending = Vec::new();
                }
                continue;
            }
            if self.flush {
                ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                self.flush = false;
            }
            if self.eof {
                // Half-close: the other direction may still have something to say.
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut *src).poll_read(cx, &mut buf))?;
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            *moved = true;
            seen(data);
            self.flush = true;
            match Pin::new(&mut *dst).poll_write(cx, data) {
                Poll::Ready(Ok(n)) if n == data.len() => {}
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.pending = data[n..].to_vec(),
                Poll::Pending => self.pending = data.to_vec(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> Option<Option<Handshake>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => Some(handshake(&req, len)),
            _ => None,
        }
    }

    #[test]
    fn only_websocket_handshakes_are_taken() {
        let ws = b"GET /i-0123456789abcdef0/ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n\x81\x00";
        let Some(Some(Handshake { request, len })) = parse(ws) else {
            panic!("a handshake");
        };
        assert_eq!(len, ws.len() - 2);
        assert_eq!(request.raw_path(), b"/i-0123456789abcdef0/ws?x=1");
        assert_eq!(request.headers["sec-websocket-key"], "k");
        let mut out = Vec::new();
        write_request_head(&request, &mut out);
        assert!(out.starts_with(b"GET /i-0123456789abcdef0/ws?x=1 HTTP/1.1\r\n"));
        assert!(out.ends_with(b"sec-websocket-key: k\r\n\r\n"));

        for other in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            b"POST /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            assert!(matches!(parse(other), Some(None)));
        }
    }

    #[test]
    fn the_workspace_answer_is_read_and_written_back() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x01a";
        let (response, len) = response_head(answer).unwrap().unwrap();
        assert_eq!(response.status.as_u16(), 101);
        assert_eq!(&answer[len..], b"\x81\x01a");
        let mut out = Vec::new();
        write_response_head(&response, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n"
        );
        assert!(matches!(response_head(&answer[..20]), Some(None)));
        assert!(response_head(b"SSH-2.0\r\n\r\n").is_none());
    }
}
