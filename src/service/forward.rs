//! The edge's own HTTP/1.1 forwarding, for the request nearly every keystroke makes: a
//! plain request to a ready instance whose owner is signed in, with a body of known, small
//! length. The request is decided by [`EdgeProxy::admit`] and rewritten through the same
//! [`super::proxy::Forwarding`] plan as on Pingora's path, written to the workspace in one
//! piece on a connection kept for the client's connection, and the answer is passed back as
//! the workspace wrote it (its head rewritten by [`EdgeProxy::rewrite_response`] only when it
//! has a `Location` or, under a prefix, a `Set-Cookie`).
//!
//! Anything less plain is never guessed at here: [`plan`] returns `None` and the request goes
//! to Pingora ([`super::edge`]).

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::edge::{KEEPALIVE, MAX_HEAD, MAX_HEADERS, SHRINK_AFTER};
use super::proxy::{page_html, text, Destination, EdgeProxy, Head, TIMED_OUT, UNREACHABLE};
use super::tunnel::{response_head, write_response_head};
use crate::provider::process::now_ms;

/// The largest request body forwarded here; a larger one streams through Pingora.
const MAX_BODY: usize = 64 * 1024;
/// What a connection reads from the workspace at once.
const ANSWER_BUFFER: usize = 16 * 1024;

/// One client connection and what it keeps between requests.
pub(super) struct Connection {
    /// `None` only while Pingora has the stream.
    client: Option<Box<L4Stream>>,
    pub client_ip: Option<IpAddr>,
    /// Bytes read from the client and not yet used: the request at the front, and whatever
    /// the client sent after it.
    pub input: Vec<u8>,
    /// The request as the workspace gets it, head and body.
    pub out: Vec<u8>,
    /// The workspace's bytes.
    answer: Vec<u8>,
    /// A rewritten response head.
    scratch: Vec<u8>,
    /// The connection to the workspace this client reached last, kept for its next
    /// request: no pool, no lock.
    upstream: Option<(SocketAddr, TcpStream)>,
}

/// A request [`plan`] took on.
pub(super) struct Forward {
    head_len: usize,
    body_len: usize,
    /// A `HEAD` request: the answer has no body, whatever its length says.
    head_only: bool,
    destination: Destination,
}

/// How a forwarded request ended.
pub(super) enum Done {
    /// Answered; the connection may carry another request.
    KeepAlive,
    /// Answered or broken off; the connection is finished.
    Close,
    /// Nothing was sent to the workspace: Pingora answers this request.
    Pingora,
}

/// How the workspace's answer ends.
#[derive(Debug, PartialEq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// The parts of the workspace's answer head that steer forwarding.
#[derive(Debug)]
struct Answer {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// Whether both connections may carry another request after this answer.
    keep_alive: bool,
    /// A `Location` or scoped `Set-Cookie` to rewrite.
    rewrite: bool,
}

impl Connection {
    pub fn new(client: Box<L4Stream>, client_ip: Option<IpAddr>) -> Self {
        Self {
            client: Some(client),
            client_ip,
            input: Vec::new(),
            out: Vec::new(),
            answer: Vec::new(),
            scratch: Vec::new(),
            upstream: None,
        }
    }

    /// Reads what the client sends next into `input`: `None` on an error or timeout.
    pub async fn read_client(&mut self, limit: Option<Duration>) -> Option<usize> {
        if self.input.capacity() - self.input.len() < 1024 {
            self.input.reserve(4096);
        }
        let client = self.client.as_mut()?;
        let read = client.read_buf(&mut self.input);
        match limit {
            Some(limit) => tokio::time::timeout(limit, read).await.ok()?.ok(),
            None => read.await.ok(),
        }
    }

    /// Reads until `input` holds at least `total` bytes (a request's head and body): `false`
    /// when the client closed, failed or went silent for `limit` first.
    pub async fn read_to(&mut self, total: usize, limit: Option<Duration>) -> bool {
        self.input.reserve(total.saturating_sub(self.input.len()));
        while self.input.len() < total {
            match self.read_client(limit).await {
                Some(n) if n > 0 => {}
                _ => return false,
            }
        }
        true
    }

    /// Writes `out` to the client: `false` when the client is gone.
    pub async fn send_out(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        client.write_all(&self.out).await.is_ok() && client.flush().await.is_ok()
    }

    /// Waits until the connection holds a request head that `plan` can plan, and returns its
    /// plan; `too_long` for a head over [`MAX_HEAD`]. `plan` answers `None` while the head is
    /// incomplete. `None`: the connection is finished (closed, silent for too long, or the
    /// server is stopping). Between requests a connection may idle for the keep-alive time
    /// (giving its buffers back after a moment) and is closed early when the server stops;
    /// within a request, `limit` applies to each read.
    pub async fn next_head<P>(
        &mut self,
        first: bool,
        shutdown: &ShutdownWatch,
        limit: Option<Duration>,
        mut plan: impl FnMut(&mut Self) -> Option<P>,
        too_long: P,
    ) -> Option<P> {
        let mut shutdown = shutdown.clone();
        loop {
            if !self.input.is_empty() {
                match plan(self) {
                    Some(plan) => return Some(plan),
                    None if self.input.len() >= MAX_HEAD => return Some(too_long),
                    None => {}
                }
            }
            let idle = self.input.is_empty() && !first;
            let n = if idle {
                if *shutdown.borrow() {
                    return None;
                }
                let mut shrunk = false;
                loop {
                    let wait = if shrunk {
                        KEEPALIVE - SHRINK_AFTER
                    } else {
                        SHRINK_AFTER
                    };
                    tokio::select! {
                        read = tokio::time::timeout(wait, self.read_client(None)) => match read {
                            Ok(n) => break n,
                            Err(_) if !shrunk => {
                                self.shrink();
                                shrunk = true;
                            }
                            Err(_) => return None,
                        },
                        _ = shutdown.changed() => return None,
                    }
                }
            } else {
                self.read_client(limit).await
            };
            if n? == 0 {
                // Closed before a whole head: nothing to answer.
                return None;
            }
        }
    }

    /// Gives the buffers back while the connection waits: an idle connection holds none.
    pub fn shrink(&mut self) {
        if self.input.is_empty() {
            self.input = Vec::new();
        }
        self.out = Vec::new();
        self.answer = Vec::new();
        self.scratch = Vec::new();
    }

    /// Gives every buffer back, what the client sent included: for a tunnel, once the
    /// handshake has been passed on.
    pub fn release(&mut self) {
        self.input = Vec::new();
        self.shrink();
    }

    /// The client's stream and our buffers, for a WebSocket tunnel. The connection to the
    /// workspace kept for plain requests is closed: the tunnel has its own.
    pub fn tunnel_parts(&mut self) -> Option<(&mut L4Stream, &[u8])> {
        self.upstream = None;
        Some((self.client.as_deref_mut()?, &self.input))
    }

    /// Hands the request at the front to Pingora's HTTP server `app` for that one request
    /// (the bytes we read put back in front of the stream), and takes the connection back
    /// afterwards: `false` when Pingora closed it.
    pub async fn through_pingora<A: HttpServerApp>(
        &mut self,
        app: &Arc<A>,
        shutdown: &ShutdownWatch,
    ) -> bool {
        let mut session = ServerSession::new_http1(self.hand_over());
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE.as_secs()));
        let Some(reused) = app.process_new_http(session, shutdown).await else {
            return false;
        };
        let (stream, _) = reused.consume();
        let Ok(client) = stream.into_any().downcast::<L4Stream>() else {
            return false;
        };
        self.client = Some(client);
        true
    }

    /// The client's stream with what we read of it put back in front, for Pingora.
    fn hand_over(&mut self) -> Stream {
        let mut client = self
            .client
            .take()
            .expect("the connection has its client stream");
        client.rewind(&self.input);
        self.input.clear();
        client
    }

    /// Carries the planned request (`out` holds its rewritten head) to the workspace and
    /// its answer back.
    pub async fn forward(&mut self, proxy: &EdgeProxy, job: Forward) -> Done {
        let config = proxy.config();
        let total = job.head_len + job.body_len;
        if !self.read_to(total, config.downstream_read_timeout).await {
            return Done::Close;
        }
        self.out.extend_from_slice(&self.input[job.head_len..total]);
        let Destination::Instance {
            upstream,
            counts,
            prefixed,
            ..
        } = &job.destination
        else {
            return Done::Pingora;
        };
        let Ok(addr) = proxy.address(Some(&job.destination)).await else {
            return Done::Pingora;
        };
        if *counts {
            upstream.touch(now_ms());
        }
        if self.answer.capacity() < ANSWER_BUFFER {
            self.answer.reserve(ANSWER_BUFFER);
        }
        // On the kept connection when it goes to the same workspace; once more on a new one
        // when a kept connection turns out closed before any answer (the workspace may close
        // idle connections whenever it likes).
        let mut reused = matches!(&self.upstream, Some((kept, _)) if *kept == addr);
        let answer = loop {
            if !reused {
                self.upstream = None;
                match tokio::time::timeout(
                    config.upstream_connect_timeout,
                    TcpStream::connect(addr),
                )
                .await
                {
                    Ok(Ok(server)) => {
                        let _ = server.set_nodelay(true);
                        self.upstream = Some((addr, server));
                    }
                    Ok(Err(_)) => return self.fail(502).await,
                    Err(_) => return self.fail(504).await,
                }
            }
            let Some((_, server)) = self.upstream.as_mut() else {
                return Done::Close;
            };
            self.answer.clear();
            let sent = server.write_all(&self.out).await;
            let read = match sent {
                Ok(()) => self.read_answer(job.head_only, *prefixed).await,
                Err(e) => Err(e),
            };
            match read {
                Ok(answer) => break answer,
                Err(_) if reused && self.answer.is_empty() => reused = false,
                Err(_) => {
                    self.upstream = None;
                    return self.fail(502).await;
                }
            }
        };
        let Some(client) = self.client.as_mut() else {
            return Done::Close;
        };
        let head_len = answer.head_len;
        let arrived = self.answer.len() - head_len;
        // What of the body came with the head, and whether that is all of it (`None`: it
        // goes on until the workspace ends it).
        let (mut now, mut left) = match answer.framing {
            Framing::Empty => (0, 0),
            Framing::Length(n) => (n.min(arrived), n - n.min(arrived)),
            Framing::Chunked | Framing::Close => (arrived, 0),
        };
        let mut chunks = Chunks::default();
        let mut finished = match answer.framing {
            Framing::Chunked => match chunks.scan(&self.answer[head_len..]) {
                Ok(Some(end)) => {
                    now = end;
                    Some(end == arrived)
                }
                Ok(None) => None,
                Err(()) => return self.broken(),
            },
            Framing::Close => None,
            // Anything after the body was not asked for: that connection is not kept.
            _ => Some(arrived == now),
        };
        let body = head_len..head_len + now;
        let written = if answer.rewrite {
            let Some(Some((mut response, _))) = response_head(&self.answer[..head_len]) else {
                return self.broken();
            };
            if proxy
                .rewrite_response(&mut response, Some(&job.destination), Some(addr))
                .is_err()
            {
                return self.broken();
            }
            self.scratch.clear();
            write_response_head(&response, &mut self.scratch);
            self.scratch.extend_from_slice(&self.answer[body]);
            client.write_all(&self.scratch).await
        } else {
            client.write_all(&self.answer[..body.end]).await
        };
        // Each piece is flushed as it is written: the client stream buffers small writes, and
        // a streamed answer must not wait in that buffer for the next piece.
        if written.is_err() || client.flush().await.is_err() {
            return self.broken();
        }
        // The rest of a body that did not come in one piece.
        let Some((_, server)) = self.upstream.as_mut() else {
            return Done::Close;
        };
        while left > 0 || finished.is_none() {
            self.answer.clear();
            match server.read_buf(&mut self.answer).await {
                Ok(0) if answer.framing == Framing::Close => {
                    finished = Some(false);
                    break;
                }
                Ok(n) if n > 0 => {}
                _ => return self.broken(),
            }
            let n = self.answer.len();
            let take = match answer.framing {
                Framing::Length(_) => {
                    let take = n.min(left);
                    left -= take;
                    if left == 0 {
                        finished = Some(take == n);
                    }
                    take
                }
                Framing::Chunked => match chunks.scan(&self.answer) {
                    Ok(Some(end)) => {
                        finished = Some(end == n);
                        end
                    }
                    Ok(None) => n,
                    Err(()) => return self.broken(),
                },
                _ => n,
            };
            if client.write_all(&self.answer[..take]).await.is_err()
                || client.flush().await.is_err()
            {
                return self.broken();
            }
        }
        self.input.drain(..total);
        if answer.keep_alive && finished == Some(true) {
            Done::KeepAlive
        } else {
            self.upstream = None;
            if answer.keep_alive {
                // The workspace sent more than its answer: the client's connection is fine.
                Done::KeepAlive
            } else {
                Done::Close
            }
        }
    }

    /// Reads the workspace's answer head into `answer`, passing informational (1xx) answers
    /// on to the client as they come.
    async fn read_answer(&mut self, head_only: bool, prefixed: bool) -> io::Result<Answer> {
        let Some((_, server)) = self.upstream.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        loop {
            if server.read_buf(&mut self.answer).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            loop {
                let answer = match parse_answer(&self.answer, head_only, prefixed) {
                    Ok(Some(answer)) => answer,
                    Ok(None) if self.answer.len() < MAX_HEAD => break,
                    _ => return Err(io::ErrorKind::InvalidData.into()),
                };
                if !(100..200).contains(&answer.status) {
                    return Ok(answer);
                }
                if answer.status == 101 {
                    // Switching protocols was not asked for.
                    return Err(io::ErrorKind::InvalidData.into());
                }
                let Some(client) = self.client.as_mut() else {
                    return Err(io::ErrorKind::NotConnected.into());
                };
                client.write_all(&self.answer[..answer.head_len]).await?;
                client.flush().await?;
                self.answer.drain(..answer.head_len);
                if self.answer.is_empty() {
                    break;
                }
            }
            if self.answer.capacity() - self.answer.len() < 1024 {
                self.answer.reserve(4096);
            }
        }
    }

    /// The connection broke off mid-answer: both sides are closed, as Pingora does.
    fn broken(&mut self) -> Done {
        self.upstream = None;
        Done::Close
    }

    /// Answers with the proxy's page for a workspace that could not be reached (502) or did
    /// not answer in time (504), and closes the connection.
    async fn fail(&mut self, status: u16) -> Done {
        let ((title, message), reason) = if status == 504 {
            (TIMED_OUT, "Gateway Timeout")
        } else {
            (UNREACHABLE, "Bad Gateway")
        };
        let body = page_html(title, message, None);
        let page = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/html; charset=utf-8\r\n\
             content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        if let Some(client) = self.client.as_mut() {
            let _ = client.write_all(page.as_bytes()).await;
            let _ = client.flush().await;
        }
        Done::Close
    }
}

/// A request head as the client sent it, for [`EdgeProxy::admit`].
struct RawHead<'h, 'b> {
    method: &'b str,
    target: &'b str,
    headers: &'h [httparse::Header<'b>],
}

impl RawHead<'_, '_> {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

impl Head for RawHead<'_, '_> {
    fn method(&self) -> &str {
        self.method
    }

    fn target(&self) -> &[u8] {
        self.target.as_bytes()
    }

    fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.first(name).and_then(text)
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| text(h.value))
            .find_map(|h| crate::core::access::cookie(h, name))
    }
}

/// Takes the request on when it is plain enough and [`EdgeProxy::admit`] lets it through,
/// writing its head as the workspace gets it into `out`. `None`: Pingora's.
pub(super) fn plan(
    proxy: &EdgeProxy,
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    client_ip: Option<IpAddr>,
    out: &mut Vec<u8>,
) -> Option<Forward> {
    let PlainRequest {
        method,
        target,
        body_len,
        close,
    } = plain_request(req)?;
    // `Connection: close` ends the client's connection too; Pingora does that.
    if close || body_len > MAX_BODY {
        return None;
    }
    let head = RawHead {
        method,
        target,
        headers: req.headers,
    };
    let destination = proxy.admit(&head, client_ip, false)?;
    let Destination::Instance { path, .. } = &destination else {
        return None;
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let plan = proxy.forwarding(
        head.first("host"),
        client_ip,
        Some(&destination),
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .map(|h| h.value),
    );
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for h in req.headers.iter() {
        if plan.drops(h.name) {
            continue;
        }
        if plan.strip_cookie && h.name.eq_ignore_ascii_case("cookie") {
            if let Some(kept) = plan.cookie(h.value) {
                line(h.name.as_bytes(), kept.as_bytes());
            }
            continue;
        }
        line(h.name.as_bytes(), h.value);
    }
    plan.each(|name, value| line(name.as_str().as_bytes(), value));
    out.extend_from_slice(b"\r\n");
    let head_only = method == "HEAD";
    Some(Forward {
        head_len,
        body_len,
        head_only,
        destination,
    })
}

/// A request head plain enough to carry without Pingora, as [`plain_request`] read it.
pub(super) struct PlainRequest<'b> {
    pub method: &'b str,
    pub target: &'b str,
    pub body_len: usize,
    /// The client sent `Connection: close`.
    pub close: bool,
}

/// The edge and the command API carry a request themselves only when it is HTTP/1.1 with an
/// origin-form target Pingora reads the same way, a body of one valid `Content-Length` (or
/// none), one `Host` at most, no `Transfer-Encoding`, `Expect` or `Upgrade`, and `Connection`
/// absent, `keep-alive` or `close`. `None`: Pingora's.
pub(super) fn plain_request<'b>(req: &httparse::Request<'_, 'b>) -> Option<PlainRequest<'b>> {
    let (Some(method), Some(1), Some(target)) = (req.method, req.version, req.path) else {
        return None;
    };
    if method == "CONNECT" || !plain_target(target) {
        return None;
    }
    let (mut body_len, mut hosts, mut close) = (None, 0, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if body_len.is_some() {
                return None;
            }
            body_len = Some(length(h.value)?);
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        }
    }
    (hosts <= 1).then_some(PlainRequest {
        method,
        target,
        body_len: body_len.unwrap_or(0),
        close,
    })
}

/// An origin-form target that `http::Uri` (and so Pingora) reads as we split it: visible
/// ASCII without a fragment or the characters it refuses.
fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'#' | b'<' | b'>' | b'`' | b'"'))
}

/// A `Content-Length` value: digits only.
fn length(value: &[u8]) -> Option<usize> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0')),
    )
}

/// Reads the head of the workspace's answer at the front of `buf`: `Ok(None)` while it is
/// incomplete, `Err` when it is not an HTTP/1 answer we can pass on.
fn parse_answer(buf: &[u8], head_only: bool, prefixed: bool) -> Result<Option<Answer>, ()> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Err(());
    };
    let (mut length_seen, mut encoded, mut chunked) = (None, false, false);
    let (mut close, mut rewrite) = (version != 1, false);
    for h in res.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = length(h.value).ok_or(())?;
            if length_seen.is_some_and(|seen| seen != n) {
                return Err(());
            }
            length_seen = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // The last coding decides; it may be in a later header.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("location")
            || (prefixed && name.eq_ignore_ascii_case("set-cookie"))
        {
            rewrite = true;
        }
    }
    let framing = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if encoded {
        // A length beside an encoding is ignored, and the connection not kept (RFC 9112 6.3).
        close |= length_seen.is_some();
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length_seen {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = !close && framing != Framing::Close;
    Ok(Some(Answer {
        head_len,
        status,
        framing,
        keep_alive,
        rewrite,
    }))
}

/// Finds the end of a chunked body as it passes, without changing it.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    /// A chunk extension, up to its line's end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Reads the next bytes of the body: `Ok(Some(n))` when it ends after the first `n`
    /// of them, `Ok(None)` when all of them belong to it and it goes on, `Err` when it is
    /// not chunked encoding.
    fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return Err(());
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(digit);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = Extension,
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err(()),
                },
                Extension => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    } else if b == b'\n' {
                        return Err(());
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take = (buf.len() - i).min(self.size as usize);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(());
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Size;
                    self.digits = 0;
                }
                TrailerStart => self.state = if b == b'\r' { EndLf } else { Trailer },
                Trailer => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == Done).then_some(buf.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8], split: &[usize]) -> Result<Option<usize>, ()> {
        let mut chunks = Chunks::default();
        let mut start = 0;
        for &at in split.iter().chain([body.len()].iter()) {
            let at = at.clamp(start, body.len());
            if let Some(end) = chunks.scan(&body[start..at])? {
                return Ok(Some(start + end));
            }
            start = at;
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_says() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for a in 0..body.len() {
            for b in [a, a + 1, a + 7, body.len()] {
                assert_eq!(scan_all(body, &[a, b]), Ok(Some(end)), "split at {a}, {b}");
            }
        }
        assert_eq!(scan_all(b"0\r\n\r\n", &[]), Ok(Some(5)));
        assert_eq!(scan_all(b"5\r\nhel", &[]), Ok(None));
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"5\nhello",
            b"fffffffffffffffff\r\n",
        ] {
            assert_eq!(
                scan_all(bad, &[]),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn answer_heads_say_how_they_end() {
        let parse = |head: &str| parse_answer(head.as_bytes(), false, true).unwrap().unwrap();
        let a = parse("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(
            (a.framing, a.keep_alive, a.rewrite),
            (Framing::Length(12), true, false)
        );
        let a = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Chunked, true));
        let a = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Chunked, false));
        let a = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Close, false));
        let a = parse("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Close, false));
        let a = parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Empty, true));
        let a = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Length(1), false));
        let a =
            parse("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!a.keep_alive);
        assert!(parse("HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n").rewrite);
        assert!(parse("HTTP/1.1 200 OK\r\nSet-Cookie: a=b\r\nContent-Length: 0\r\n\r\n").rewrite);
        let head = "HTTP/1.1 200 OK\r\nSet-Cookie: a=b\r\nContent-Length: 0\r\n\r\n";
        assert!(
            !parse_answer(head.as_bytes(), false, false)
                .unwrap()
                .unwrap()
                .rewrite
        );
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(
            parse_answer(head.as_bytes(), true, true)
                .unwrap()
                .unwrap()
                .framing,
            Framing::Empty
        );
        assert!(parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            true
        )
        .is_err());
        assert!(parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            false,
            true
        )
        .is_err());
        assert!(parse_answer(b"SSH-2.0\r\n\r\n", false, true).is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-", false, true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn targets_are_split_as_http_uri_splits_them() {
        // The premise of forwarding from our own parse: for every target `plan` accepts,
        // the path and query are what Pingora's parsed URI would give.
        for target in [
            "/i-1/a?b=c",
            "/a?",
            "/a??b",
            "/",
            "/a;b?c=d&e",
            "/%2e%2E/x",
            "/a?b/c?d",
        ] {
            let head = RawHead {
                method: "GET",
                target,
                headers: &[],
            };
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(head.path(), uri.path(), "{target}");
            assert_eq!(head.query(), uri.query(), "{target}");
        }
    }

    proptest::proptest! {
        /// Every target `plan` takes on is one Pingora would have taken too, split the same.
        #[test]
        fn every_target_taken_is_read_as_pingora_reads_it(target in "/[!-~]{0,40}") {
            proptest::prop_assume!(plain_target(&target));
            let uri: http::Uri = target.parse().expect("http::Uri takes it");
            let head = RawHead { method: "GET", target: &target, headers: &[] };
            proptest::prop_assert_eq!(head.path(), uri.path());
            proptest::prop_assert_eq!(head.query(), uri.query());
        }
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(length(b"0"), Some(0));
        assert_eq!(length(b" 42 "), Some(42));
        for bad in [&b""[..], b"+1", b"1,1", b"0x10", b"99999999999999999999"] {
            assert_eq!(length(bad), None);
        }
    }
}
