//! One client connection of the hand-written HTTP/1.1 path: reading request heads with a
//! deadline, handing a request to Pingora and taking the connection back, and carrying a
//! request the caller wrote to an upstream server on a connection kept for this client,
//! with the answer passed back framed as [`answer::read`] framed it. It knows nothing of
//! routing, access or the pool: the caller plans, rewrites and answers errors.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::answer::{self, Answer, Framing, Refusal};
use super::chunks::Chunks;
use super::client::ClientStream;
use super::{KEEPALIVE, MAX_HEAD, SHRINK_AFTER};

/// What a connection reads from the upstream server at once.
const ANSWER_BUFFER: usize = 16 * 1024;

/// One client connection and what it keeps between requests.
pub struct Connection<C = L4Stream> {
    /// `None` only while Pingora has the stream.
    client: Option<Box<C>>,
    pub client_ip: Option<IpAddr>,
    /// Bytes read from the client and not yet used: the request at the front, and whatever
    /// the client sent after it.
    pub input: Vec<u8>,
    /// The request as the upstream server gets it, head and body (or an answer of ours).
    pub out: Vec<u8>,
    /// The upstream server's bytes.
    answer: Vec<u8>,
    /// The answer head as the client gets it.
    head: Vec<u8>,
    /// The connection to the upstream server this client reached last, kept for its next
    /// request: no pool, no lock.
    upstream: Option<(SocketAddr, TcpStream)>,
    /// An interim (1xx) answer to the current request reached the client: the request is
    /// known to have arrived, and is never sent again.
    interim: bool,
    /// The status of the last final answer [`Self::exchange`] read (0: none yet).
    pub status: u16,
}

/// How long a client may take over a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For a whole request head, from its first byte (or from the connection's start).
    pub head: Option<Duration>,
    /// For each read within a request.
    pub read: Option<Duration>,
}

/// A request in `out` for [`Connection::exchange`].
pub struct Exchange {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    /// A `HEAD` request: the answer has no body, whatever its length says.
    pub head_only: bool,
    /// May be sent again when a kept connection fails before any answer (RFC 9110 §9.2.2).
    pub retry: bool,
    /// A protocol upgrade: a `101` ends the exchange with [`Outcome::Upgraded`].
    pub upgrade: bool,
}

/// How an exchange ended.
pub enum Outcome {
    /// Answered; the client's connection may carry another request.
    KeepAlive,
    /// Answered or broken off mid-answer; the client's connection is finished.
    Close,
    /// Nothing reached the client: the caller answers with `status` (502: unreachable or a
    /// broken answer, 504: connecting timed out) and closes.
    Failed(u16, Failure),
    /// The server switched protocols; its `101` (rewritten) and any bytes after it were
    /// passed on. The stream is the caller's.
    Upgraded(TcpStream),
}

/// Why nothing reached the client, for the log.
#[derive(Debug)]
pub enum Failure {
    Connect(io::Error),
    ConnectTimeout,
    /// The request could not be sent, or the server closed before a whole answer head.
    Io(io::Error),
    Answer(Refusal),
    /// A chunked body that is not strict chunked encoding.
    Chunks,
    /// The caller's rewrite of the head refused it.
    Rewrite,
}

impl<C: ClientStream> Connection<C> {
    pub fn new(client: Box<C>, client_ip: Option<IpAddr>) -> Self {
        Self {
            client: Some(client),
            client_ip,
            input: Vec::new(),
            out: Vec::new(),
            answer: Vec::new(),
            head: Vec::new(),
            upstream: None,
            interim: false,
            status: 0,
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

    /// Answers with a small page of the caller's and `Connection: close`.
    pub async fn send_page(&mut self, status: u16, content_type: &str, body: &str) {
        self.out.clear();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        self.out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n\
                 content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body.as_bytes());
        self.send_out().await;
    }

    /// Waits until the connection holds a request head that `plan` can plan, and returns its
    /// plan; `too_long` for a head over [`MAX_HEAD`]. `plan` answers `None` while the head is
    /// incomplete. `None`: the connection is finished (closed, silent for too long, or the
    /// server is stopping). Between requests a connection may idle for the keep-alive time
    /// (giving its buffers back after a moment) and is closed early when the server stops;
    /// a head must be complete within `limits.head` of the first read that found it
    /// incomplete (of the connection's start, for the first), or it is answered with 408.
    pub async fn next_head<P>(
        &mut self,
        first: bool,
        shutdown: &ShutdownWatch,
        limits: Limits,
        mut plan: impl FnMut(&mut Self) -> Option<P>,
        too_long: P,
    ) -> Option<P> {
        let mut shutdown = shutdown.clone();
        // Set when a read within a head is first needed: a head that comes whole in the read
        // that ended the keep-alive wait (nearly all of them) never reads the clock.
        let mut deadline: Option<Instant> = None;
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
                if deadline.is_none() {
                    deadline = limits.head.map(|d| Instant::now() + d);
                }
                let limit = match (limits.read, deadline) {
                    (read, None) => read,
                    (read, Some(deadline)) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        Some(read.map_or(left, |read| read.min(left)))
                    }
                };
                let n = self.read_client(limit).await;
                if n.is_none() && deadline.is_some_and(|d| d <= Instant::now()) {
                    if !self.input.is_empty() {
                        self.send_page(
                            408,
                            "text/plain; charset=utf-8",
                            "The request was not sent in time.\n",
                        )
                        .await;
                    }
                    return None;
                }
                n
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
        self.head = Vec::new();
    }

    /// Gives every buffer back, what the client sent included: for a tunnel, once the
    /// handshake has been passed on.
    pub fn release(&mut self) {
        self.input = Vec::new();
        self.shrink();
    }

    /// The client's stream, for a tunnel. The connection kept for plain requests is closed:
    /// the tunnel has its own.
    pub fn client_stream(&mut self) -> Option<&mut C> {
        self.upstream = None;
        self.client.as_deref_mut()
    }

    /// Hands the request at the front to Pingora's HTTP server `app` for that one request
    /// (the bytes we read put back in front of the stream), and takes the connection back
    /// afterwards: `false` when Pingora closed it.
    pub async fn through_pingora<A: HttpServerApp>(
        &mut self,
        app: &Arc<A>,
        shutdown: &ShutdownWatch,
    ) -> bool {
        let Some(client) = self.client.take() else {
            return false;
        };
        let client = client.lend(&self.input);
        self.input.clear();
        let mut session = ServerSession::new_http1(client);
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE.as_secs()));
        let Some(reused) = app.process_new_http(session, shutdown).await else {
            return false;
        };
        let (stream, _) = reused.consume();
        let Some(client) = C::take_back(stream) else {
            return false;
        };
        self.client = Some(client);
        true
    }

    /// Sends the request in `out` to `job.addr` and passes the answer back to the client,
    /// its head as [`answer::read`] wrote it (or as it came, when that is the same) and, when
    /// it has a `Location` or `Set-Cookie`, through `rewrite` (which may change the head in
    /// place, or refuse it with `false`). The connection is kept for the client's
    /// next request when the answer allows; a kept one is used again only when nothing
    /// arrived on it since, and a request is sent again on a new connection only when it may
    /// be repeated and the kept one failed before any answer.
    pub async fn exchange(
        &mut self,
        job: &Exchange,
        rewrite: impl FnOnce(&Answer, &mut Vec<u8>) -> bool,
    ) -> Outcome {
        if self.answer.capacity() < ANSWER_BUFFER {
            self.answer.reserve(ANSWER_BUFFER);
        }
        self.interim = false;
        self.status = 0;
        let mut reused = match &self.upstream {
            Some((kept, server)) => *kept == job.addr && quiet(server),
            None => false,
        };
        let answer = loop {
            if !reused {
                self.upstream = None;
                match tokio::time::timeout(job.connect_timeout, TcpStream::connect(job.addr)).await
                {
                    Ok(Ok(server)) => {
                        let _ = server.set_nodelay(true);
                        self.upstream = Some((job.addr, server));
                    }
                    Ok(Err(e)) => return Outcome::Failed(502, Failure::Connect(e)),
                    Err(_) => return Outcome::Failed(504, Failure::ConnectTimeout),
                }
            }
            let Some((_, server)) = self.upstream.as_mut() else {
                return Outcome::Close;
            };
            self.answer.clear();
            let read = match server.write_all(&self.out).await {
                Ok(()) => self.read_answer(job).await,
                Err(e) => Err(Failure::Io(e)),
            };
            match read {
                Ok(answer) => break answer,
                Err(Failure::Io(_))
                    if reused && job.retry && self.answer.is_empty() && !self.interim =>
                {
                    reused = false
                }
                Err(failure) => {
                    self.upstream = None;
                    return Outcome::Failed(502, failure);
                }
            }
        };
        let head_len = answer.head_len;
        self.status = answer.status;
        let arrived = (self.answer.len() - head_len) as u64;
        if job.upgrade && answer.status == 101 {
            if !self.client_head(&answer, rewrite) {
                self.upstream = None;
                return Outcome::Failed(502, Failure::Rewrite);
            }
            self.head.extend_from_slice(&self.answer[head_len..]);
            let Some((client, (_, server))) = self.client.as_mut().zip(self.upstream.take()) else {
                return Outcome::Close;
            };
            if client.write_all(&self.head).await.is_err() || client.flush().await.is_err() {
                return Outcome::Close;
            }
            return Outcome::Upgraded(server);
        }
        // What of the body came with the head, and whether that is all of it (`None`: it
        // goes on until the server ends it).
        let (mut now, mut left) = match answer.framing {
            Framing::Empty => (0, 0),
            Framing::Length(n) => (n.min(arrived), n - n.min(arrived)),
            Framing::Chunked | Framing::Close => (arrived, 0),
        };
        let mut chunks = Chunks::default();
        let mut finished = match answer.framing {
            Framing::Chunked => match chunks.scan(&self.answer[head_len..]) {
                Ok(Some(end)) => {
                    now = end as u64;
                    Some(end as u64 == arrived)
                }
                Ok(None) => None,
                Err(()) => {
                    self.upstream = None;
                    return Outcome::Failed(502, Failure::Chunks);
                }
            },
            Framing::Close => None,
            // Anything after the body was not asked for: that connection is not kept.
            _ => Some(arrived == now),
        };
        let as_it_came = answer.canonical && !(answer.location || answer.set_cookie);
        if !as_it_came && !self.client_head(&answer, rewrite) {
            self.upstream = None;
            return Outcome::Failed(502, Failure::Rewrite);
        }
        let Some(client) = self.client.as_mut() else {
            return Outcome::Close;
        };
        let end = head_len + now as usize;
        // Each piece is flushed as it is written: the client stream buffers small writes, and
        // a streamed answer must not wait in that buffer for the next piece.
        let written = if as_it_came {
            client.write_all(&self.answer[..end]).await
        } else {
            match client.write_all(&self.head).await {
                Ok(()) => client.write_all(&self.answer[head_len..end]).await,
                Err(e) => Err(e),
            }
        };
        if written.is_err() || client.flush().await.is_err() {
            return self.broken();
        }
        // The rest of a body that did not come in one piece.
        let Some((_, server)) = self.upstream.as_mut() else {
            return Outcome::Close;
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
                    let take = (n as u64).min(left);
                    left -= take;
                    if left == 0 {
                        finished = Some(take == n as u64);
                    }
                    take as usize
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
        if job.upgrade {
            // A refused upgrade: what the client sent after its handshake was meant for
            // another protocol, not as a next request.
            self.upstream = None;
            return Outcome::Close;
        }
        if !(answer.keep_alive && finished == Some(true)) {
            self.upstream = None;
        }
        if answer.keep_alive {
            // When the server sent more than its answer, only its connection is dropped.
            Outcome::KeepAlive
        } else {
            Outcome::Close
        }
    }

    /// Puts the answer head as the client gets it into `head` (copied when it came canonical)
    /// and, when it has a `Location` or `Set-Cookie`, lets `rewrite` change it: `false` when
    /// `rewrite` refused it.
    fn client_head(
        &mut self,
        answer: &Answer,
        rewrite: impl FnOnce(&Answer, &mut Vec<u8>) -> bool,
    ) -> bool {
        if answer.canonical {
            self.head.clear();
            self.head.extend_from_slice(&self.answer[..answer.head_len]);
        }
        !(answer.location || answer.set_cookie) || rewrite(answer, &mut self.head)
    }

    /// Reads the server's answer head into `answer` and, unless it came canonical, its
    /// canonical form into `head`,
    /// passing informational (1xx) answers on to the client as they come.
    async fn read_answer(&mut self, job: &Exchange) -> Result<Answer, Failure> {
        let Some((_, server)) = self.upstream.as_mut() else {
            return Err(Failure::Io(io::ErrorKind::NotConnected.into()));
        };
        loop {
            match server.read_buf(&mut self.answer).await {
                Ok(0) => return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(Failure::Io(e)),
            }
            loop {
                self.head.clear();
                let answer = match answer::read(&self.answer, job.head_only, &mut self.head) {
                    Ok(Some(answer)) => answer,
                    Ok(None) => break,
                    Err(refusal) => return Err(Failure::Answer(refusal)),
                };
                if !(100..200).contains(&answer.status) || (job.upgrade && answer.status == 101) {
                    return Ok(answer);
                }
                if answer.status == 101 {
                    // Switching protocols was not asked for.
                    return Err(Failure::Answer(Refusal::Malformed));
                }
                let Some(client) = self.client.as_mut() else {
                    return Err(Failure::Io(io::ErrorKind::NotConnected.into()));
                };
                let head = if answer.canonical {
                    &self.answer[..answer.head_len]
                } else {
                    &self.head[..]
                };
                let sent = client.write_all(head).await;
                if let Err(e) = sent.and(client.flush().await) {
                    return Err(Failure::Io(e));
                }
                self.interim = true;
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
    fn broken(&mut self) -> Outcome {
        self.upstream = None;
        Outcome::Close
    }
}

/// Whether nothing has arrived on a kept connection since its last answer: neither bytes
/// the server was not asked for (which would be read as the next answer) nor its close.
/// Asks the kernel, not the runtime's cached readiness, which may not have seen them yet.
fn quiet(server: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: `recv` writes at most one byte into `byte`, which outlives the call; the
    // descriptor belongs to `server`, borrowed for the call. MSG_PEEK leaves the stream as
    // it was and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            server.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}
