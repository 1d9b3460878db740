//! Pingora's graceful upgrade, end to end. Server A runs with an `upgrade_sock` of its own;
//! HTTP load (keep-alive connections and a new connection per request), WebSockets and long
//! polls run through its proxy; server B is started with `-u` and the same configuration,
//! then A gets SIGQUIT, as the systemd steps of deploy/README.md do it. Nothing may fail:
//! every request is answered, the WebSockets opened on A echo until A's grace period ends,
//! are closed cleanly (never reset) and reconnect to B, long polls in flight complete, A exits
//! on its own, new connections are B's, and every user keeps their instance. Two more cases:
//! a workspace slow to answer B's first readiness probes (B's proxy starts once its pool is
//! rebuilt and probed), and assignments while both processes answer the command API (A hands
//! the pool over on SIGQUIT and answers 503 from then on; B takes the state folder's lock
//! before it rebuilds the pool, so that one instance never gets two owners).
//!
//! Which process served a connection is asked of the kernel, with no help from the server:
//! sock_diag names the inode of the server's end of the connection, /proc the process that
//! holds it.

mod common;

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, wait_ready, Options, Server};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::MaybeTlsStream;

/// Pingora's `grace_period_seconds`: how long the old process serves the connections it has
/// after it stopped accepting.
const GRACE: Duration = Duration::from_secs(3);
/// Pingora's `graceful_shutdown_timeout_seconds`: the last step, after the grace period.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the old process goes on accepting after it sent its sockets, for the new one to
/// get ready: `CLOSE_TIMEOUT` in pingora-core 0.9, not configurable.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The demo workspace's long poll: shorter than the grace period, as every request must be
/// for the upgrade to drop none.
const LONG_POLL_MS: u64 = 1500;

/// A purpose section that runs the demo workspace with a short long poll.
fn demo_purpose(long_poll_ms: u64) -> String {
    format!(
        "purposes:\n  rstudio:\n    command: [\"{{exe}}\", \"demo-workspace\", \"--port\", \"{{port}}\", \"--instance-id\", \"{{instance_id}}\", \"--long-poll-ms\", \"{long_poll_ms}\"]\n"
    )
}

// ---- Which process holds a connection ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    A,
    B,
    /// Neither holds the server's end any more (it closed it), or it was never found.
    Unknown,
}

struct Procs {
    a: u32,
    b: AtomicU32,
    /// When A got its signal.
    quit: std::sync::OnceLock<Instant>,
}

impl Procs {
    /// Seconds since A got its signal (0 before).
    fn since_quit(&self) -> f64 {
        self.quit.get().map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// The process that holds the server's end of the client connection `stream`.
    fn who(&self, stream: &TcpStream) -> Who {
        let (Ok(SocketAddr::V4(client)), Ok(SocketAddr::V4(server))) =
            (stream.local_addr(), stream.peer_addr())
        else {
            return Who::Unknown;
        };
        let Some(inode) = socket_inode(server, client) else {
            return Who::Unknown;
        };
        let link = format!("socket:[{inode}]");
        for (who, pid) in [(Who::A, self.a), (Who::B, self.b.load(Ordering::Relaxed))] {
            if pid != 0 && holds(pid, &link) {
                return who;
            }
        }
        Who::Unknown
    }

    fn who_ws(&self, socket: &Socket) -> Who {
        match socket.get_ref() {
            MaybeTlsStream::Plain(stream) => self.who(stream),
            _ => Who::Unknown,
        }
    }
}

/// Whether process `pid` has a descriptor open on `link` (`socket:[<inode>]`).
fn holds(pid: u32, link: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link))
}

/// The inode of the TCP socket whose own address is `local` and whose peer is `remote`, from
/// the kernel's sock_diag (one exact lookup, as `ss` does); `None` when there is no such
/// socket or it belongs to no descriptor any more.
fn socket_inode(local: SocketAddrV4, remote: SocketAddrV4) -> Option<u32> {
    // struct inet_diag_sockid
    #[repr(C)]
    struct SockId {
        sport: [u8; 2],
        dport: [u8; 2],
        src: [u32; 4],
        dst: [u32; 4],
        interface: u32,
        cookie: [u32; 2],
    }
    // struct nlmsghdr + struct inet_diag_req_v2
    #[repr(C)]
    struct Request {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let request = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        id: SockId {
            sport: local.port().to_be_bytes(),
            dport: remote.port().to_be_bytes(),
            src: [u32::from_ne_bytes(local.ip().octets()), 0, 0, 0],
            dst: [u32::from_ne_bytes(remote.ip().octets()), 0, 0, 0],
            interface: 0,
            cookie: [!0, !0],
        },
    };
    let mut answer = [0u8; 1024];
    // SAFETY: plain system calls on a descriptor of our own, with buffers of the sizes given.
    let n = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return None;
        }
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            fd,
            &request as *const Request as *const libc::c_void,
            std::mem::size_of::<Request>(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        let n = if sent < 0 {
            -1
        } else {
            libc::recv(
                fd,
                answer.as_mut_ptr() as *mut libc::c_void,
                answer.len(),
                0,
            )
        };
        libc::close(fd);
        n
    };
    // nlmsghdr (16 bytes), then struct inet_diag_msg: family, state, timer, retrans, the
    // 48-byte sockid, expires, rqueue, wqueue, uid, inode.
    if n < 16 + 72 || u16::from_ne_bytes([answer[4], answer[5]]) != SOCK_DIAG_BY_FAMILY {
        return None; // NLMSG_ERROR: no such socket
    }
    let inode = u32::from_ne_bytes(answer[16 + 68..16 + 72].try_into().unwrap());
    (inode != 0).then_some(inode)
}

// ---- HTTP load ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    KeepAlive,
    NewConnection,
    LongPoll,
}

struct Sample {
    kind: Kind,
    at: Instant,
    who: Who,
    outcome: Result<(), String>,
    /// Sent again on a new connection: the kept one (whose process, what happened) ended
    /// before any byte of an answer.
    retried: Option<(Who, String)>,
}

type Samples = Arc<Mutex<Vec<Sample>>>;

fn record(samples: &Samples, kind: Kind, at: Instant, who: Who, outcome: Result<(), String>) {
    samples.lock().unwrap().push(Sample {
        kind,
        at,
        who,
        outcome,
        retried: None,
    });
}

enum Failure {
    /// The connection ended (closed or reset) before any byte of an answer.
    ClosedBeforeAnswer(String),
    Other(String),
}

/// Sends one request and reads its whole answer: the status.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<u16, Failure> {
    if let Err(e) = stream.write_all(request).await {
        return Err(Failure::ClosedBeforeAnswer(format!("sending: {e}")));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await;
        let ended = match read {
            Err(_) => {
                return Err(Failure::Other(format!(
                    "no whole answer within 10 s ({} bytes)",
                    buf.len()
                )))
            }
            Ok(Ok(0)) => "closed".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                match whole_answer(&buf) {
                    Ok(Some(status)) => return Ok(status),
                    Ok(None) => continue,
                    Err(e) => return Err(Failure::Other(e)),
                }
            }
        };
        return Err(if buf.is_empty() {
            Failure::ClosedBeforeAnswer(ended)
        } else {
            Failure::Other(format!("{ended} after {} bytes of the answer", buf.len()))
        });
    }
}

/// The status of the answer in `buf` once it is whole (it must say its length).
fn whole_answer(buf: &[u8]) -> Result<Option<u16>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("a malformed answer: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    if let Some(length) = header("content-length") {
        let length: usize = length
            .trim()
            .parse()
            .map_err(|_| format!("Content-Length {length:?}"))?;
        return Ok((buf.len() >= head + length).then_some(status));
    }
    if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        return Ok(buf.ends_with(b"0\r\n\r\n").then_some(status));
    }
    if status == 204 || status == 304 {
        return Ok(Some(status));
    }
    Err(format!("an answer {status} without a length"))
}

/// Client loops through the proxy, each recording every request's outcome.
struct Load {
    proxy: SocketAddr,
    procs: Arc<Procs>,
    samples: Samples,
    stop: Arc<AtomicBool>,
    /// Kept connections found closed by the server between two requests.
    closed_between: Arc<AtomicUsize>,
}

/// Whether a kept connection is still open with nothing unasked for waiting on it.
fn open_and_idle(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl Load {
    /// Requests one after another on a kept connection, a new one when the server closed it.
    /// A request whose kept connection ends before any byte of an answer is sent once more on
    /// a new connection, as browsers do (RFC 9112 9.3.1: the server closed an idle connection
    /// as the request went out, and never saw it); that is counted, and a second such end is
    /// a failure.
    async fn keep_alive(self, kind: Kind, request: Vec<u8>, pause: Duration) {
        let mut conn: Option<(TcpStream, Who)> = None;
        let mut retrying: Option<(Who, String)> = None;
        // The first attempt's time, for a request sent again.
        let mut first_at = None;
        while !self.stop.load(Ordering::Relaxed) {
            let at = first_at.take().unwrap_or_else(Instant::now);
            // As pooled clients do (hyper, browsers): a kept connection that the server has
            // closed meanwhile is not used again.
            if conn.as_ref().is_some_and(|(s, _)| !open_and_idle(s)) {
                conn = None;
                self.closed_between.fetch_add(1, Ordering::Relaxed);
            }
            let reused = conn.is_some();
            let (stream, who) = match &mut conn {
                Some(c) => c,
                None => match TcpStream::connect(self.proxy).await {
                    Ok(s) => conn.insert((s, Who::Unknown)),
                    Err(e) => {
                        self.samples.lock().unwrap().push(Sample {
                            kind,
                            at,
                            who: Who::Unknown,
                            outcome: Err(format!("connecting: {e}")),
                            retried: retrying.take(),
                        });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let outcome = match exchange(stream, &request).await {
                Ok(status) => {
                    if *who == Who::Unknown {
                        *who = self.procs.who(stream);
                    }
                    (status == 200)
                        .then_some(())
                        .ok_or(format!("status {status}"))
                }
                Err(Failure::ClosedBeforeAnswer(e)) if reused && retrying.is_none() => {
                    let after = at.elapsed().as_millis();
                    retrying = Some((*who, format!("{e}, {after} ms after it was sent")));
                    first_at = Some(at);
                    conn = None;
                    continue;
                }
                Err(Failure::ClosedBeforeAnswer(e) | Failure::Other(e)) => Err(format!(
                    "{e} ({} connection)",
                    if reused { "kept" } else { "new" }
                )),
            };
            let who = conn.as_ref().map_or(Who::Unknown, |c| c.1);
            if outcome.is_err() {
                conn = None;
            }
            self.samples.lock().unwrap().push(Sample {
                kind,
                at,
                who,
                outcome,
                retried: retrying.take(),
            });
            tokio::time::sleep(pause).await;
        }
    }

    /// A new connection for every request, closed by the client after the answer.
    async fn new_connections(self, request: Vec<u8>, pause: Duration) {
        while !self.stop.load(Ordering::Relaxed) {
            let at = Instant::now();
            let (who, outcome) = match TcpStream::connect(self.proxy).await {
                Err(e) => (Who::Unknown, Err(format!("connecting: {e}"))),
                Ok(mut stream) => match exchange(&mut stream, &request).await {
                    Ok(status) => (
                        self.procs.who(&stream),
                        (status == 200)
                            .then_some(())
                            .ok_or(format!("status {status}")),
                    ),
                    Err(Failure::ClosedBeforeAnswer(e) | Failure::Other(e)) => {
                        (Who::Unknown, Err(e))
                    }
                },
            };
            record(&self.samples, Kind::NewConnection, at, who, outcome);
            tokio::time::sleep(pause).await;
        }
    }
}

// ---- WebSockets ----

type Socket = tokio_tungstenite::WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_open(url: &str, procs: &Procs) -> Result<(Socket, Who), String> {
    let (socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("opening: {e}"))?;
    if response.status().as_u16() != 101 {
        return Err(format!("opening: {}", response.status()));
    }
    let who = procs.who_ws(&socket);
    Ok((socket, who))
}

/// How a socket ended, from what reading it gave: `Ok` when cleanly.
fn ending(read: Option<Result<Message, tungstenite::Error>>) -> Result<&'static str, String> {
    use tungstenite::error::ProtocolError;
    match read {
        Some(Ok(Message::Close(_))) => Ok("a close frame"),
        None
        | Some(Err(
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        )) => Ok("EOF"),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(other)) => Err(format!("an unexpected message {other:?}")),
    }
}

#[derive(Default)]
struct WsReport {
    opened_by: Option<Who>,
    /// The last echo on the socket opened before the upgrade.
    last_echo_before_end: Option<Instant>,
    /// When and how the socket opened before the upgrade ended.
    ended: Option<(Instant, String)>,
    reconnected_to: Vec<Who>,
    echoes_after: usize,
    failures: Vec<String>,
}

/// Echoes a message every 100 ms, watching the socket in between; when the socket ends it
/// opens another, as a page's script does.
async fn ws_client(
    n: usize,
    url: String,
    mut socket: Socket,
    procs: Arc<Procs>,
    stop: Arc<AtomicBool>,
) -> WsReport {
    let mut report = WsReport {
        opened_by: Some(procs.who_ws(&socket)),
        ..WsReport::default()
    };
    let mut first = true;
    let mut count = 0;
    while !stop.load(Ordering::Relaxed) {
        let idle = tokio::select! {
            read = socket.next() => Some(read),
            _ = tokio::time::sleep(Duration::from_millis(100)) => None,
        };
        let ended = match idle {
            Some(read) => (ending(read), false),
            None => {
                count += 1;
                let text = format!("ws{n}-{count}");
                if let Err(e) = socket.send(Message::text(text.clone())).await {
                    (Err(format!("sending: {e}")), true)
                } else {
                    match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
                        Err(_) => (Err("no echo within 5 s".to_owned()), true),
                        Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => {
                            if first {
                                report.last_echo_before_end = Some(Instant::now());
                            } else {
                                report.echoes_after += 1;
                            }
                            continue;
                        }
                        Ok(read) => (ending(read), true),
                    }
                }
            }
        };
        let which = if first {
            "the socket opened before the upgrade"
        } else {
            "a socket opened again"
        };
        let (how, in_flight) = ended;
        let when = if in_flight {
            "with a message in flight"
        } else {
            "while idle"
        };
        match how {
            Ok(how) if first => report.ended = Some((Instant::now(), format!("{how} {when}"))),
            Ok(how) => report.failures.push(format!("{which} ended: {how} {when}")),
            Err(e) => report.failures.push(format!(
                "{which}: {e} {when}, {:.2} s after SIGQUIT",
                procs.since_quit()
            )),
        }
        first = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return report;
            }
            match ws_open(&url, &procs).await {
                Ok((s, who)) => {
                    socket = s;
                    report.reconnected_to.push(who);
                    break;
                }
                Err(e) => {
                    report.failures.push(format!("reconnecting: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    let _ = socket.close(None).await;
    report
}

/// `REQUEST_RSTUDIO` for `user` on a new connection to the command API: the process that
/// answered and the instance it named.
/// `REQUEST_RSTUDIO` as a caller that honours a 503 does: asked again a moment later (the
/// old process answers 503 once it has handed the pool over, and the new one until it has
/// rebuilt it). Any other failure, or 503s for more than 15 s, is the answer.
async fn assign(api: SocketAddr, procs: &Procs, user: &str) -> Result<(Who, String), String> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match assign_once(api, procs, user).await {
            Err(e) if e.starts_with("503 ") && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

async fn assign_once(api: SocketAddr, procs: &Procs, user: &str) -> Result<(Who, String), String> {
    let body =
        serde_json::json!({"command": "REQUEST_RSTUDIO", "payload": {"userId": user}}).to_string();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(api)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(status) = whole_answer(&buf)? {
            let who = procs.who(&stream);
            let text = String::from_utf8_lossy(&buf);
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            return match value["instanceId"].as_str() {
                Some(id) if status == 200 => Ok((who, id.to_owned())),
                _ => Err(format!("{status} {body}")),
            };
        }
    }
}

/// What else happens around the upgrade.
#[derive(Clone, Copy, Default)]
struct Scenario {
    /// The warm free workspace does not answer (stopped): B's first readiness probes wait on it.
    stalled_free_workspace: bool,
    /// Users are assigned workspaces while both processes answer the command API.
    assignments_during_overlap: bool,
}

/// A process of ours, killed if the test ends while it runs.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Load of every kind across the upgrade, no assignments.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_upgrade_drops_nobody() {
    upgrade_under_load(Scenario::default()).await;
}

/// The instances B adopts are `launching` until a first round of readiness probes has
/// answered, and that round waits for every probe (2 s for one that hangs): B's proxy starts
/// accepting only after it, so meanwhile A serves (and the kernel queues) new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_upgrade_drops_nobody_while_a_workspace_is_slow_to_answer() {
    upgrade_under_load(Scenario {
        stalled_free_workspace: true,
        ..Scenario::default()
    })
    .await;
}

/// For Pingora's 5 s `CLOSE_TIMEOUT` both processes accept on the command API. Only one may
/// assign: otherwise one could hand a free instance to one user while the other hands it to
/// another. A answers 503 once it has handed over; callers ask again, as a 503 says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_upgrade_keeps_one_owner_per_instance_while_users_are_assigned() {
    upgrade_under_load(Scenario {
        assignments_during_overlap: true,
        ..Scenario::default()
    })
    .await;
}

async fn upgrade_under_load(scenario: Scenario) {
    let mut server = Server::start_edited(
        Options {
            min_free: 1,
            max: 12,
            extra_yaml: demo_purpose(LONG_POLL_MS),
            ..Options::default()
        },
        |dir, text| {
            let keys = format!(
                "grace_period_seconds: {}\ngraceful_shutdown_timeout_seconds: {}\nupgrade_sock: {}\n",
                GRACE.as_secs(),
                SHUTDOWN_TIMEOUT.as_secs(),
                dir.join("upgrade.sock").display()
            );
            let edited = text.replace(
                "grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
                &keys,
            );
            assert_ne!(edited, text, "the generated configuration changed: edit it anew");
            edited
        },
    )
    .await;
    let upgrade_sock = server.dir.join("upgrade.sock");
    let users = ["ana", "ben", "cy"];
    let mut ids = Vec::new();
    for user in users {
        ids.push(server.request(user).await);
    }
    for id in &ids {
        wait_ready(&server, id).await;
    }
    if scenario.stalled_free_workspace {
        eventually(
            "a free workspace is ready",
            Duration::from_secs(20),
            || async { (server.census("rstudio").await["freeReady"] == 1).then_some(()) },
        )
        .await;
        for (pid, id) in server.workspaces() {
            if !ids.contains(&id) {
                // SAFETY: a signal to a workspace process of this test's server.
                unsafe {
                    libc::kill(pid as i32, libc::SIGSTOP);
                }
            }
        }
    }

    let procs = Arc::new(Procs {
        a: server.pid().expect("A runs"),
        b: AtomicU32::new(0),
        quit: Default::default(),
    });
    let samples: Samples = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let closed_between = Arc::new(AtomicUsize::new(0));
    let load = || Load {
        closed_between: Arc::clone(&closed_between),
        proxy: server.proxy,
        procs: Arc::clone(&procs),
        samples: Arc::clone(&samples),
        stop: Arc::clone(&stop),
    };
    let host = server.proxy;
    let mut loops = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let get = format!("GET /{id}/headers HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
        loops.push(tokio::spawn(load().keep_alive(
            Kind::KeepAlive,
            get.clone(),
            Duration::from_millis(5),
        )));
        loops.push(tokio::spawn(
            load().new_connections(get, Duration::from_millis(10)),
        ));
        if i < 2 {
            let poll = format!(
                "POST /{id}/events/get_events HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            )
            .into_bytes();
            loops.push(tokio::spawn(load().keep_alive(
                Kind::LongPoll,
                poll,
                Duration::ZERO,
            )));
        }
    }
    let mut sockets = Vec::new();
    for n in 0..4 {
        let url = format!("ws://{}/{}/ws", server.proxy, ids[n % ids.len()]);
        let (socket, _) = ws_open(&url, &procs).await.unwrap();
        sockets.push(tokio::spawn(ws_client(
            n,
            url,
            socket,
            Arc::clone(&procs),
            Arc::clone(&stop),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The upgrade: B with `-u` and the same configuration, then SIGQUIT to A.
    let b = server.spawn_another(&["-u"], "server.log");
    procs.b.store(b.id(), Ordering::Relaxed);
    let mut a = Process(server.swap_child(Some(b)).expect("A runs"));
    let waiting = Instant::now();
    while !upgrade_sock.exists() && waiting.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b_waited = upgrade_sock.exists();
    // SAFETY: a signal to our own child, which has not been waited for.
    unsafe {
        libc::kill(procs.a as i32, libc::SIGQUIT);
    }
    let quit = Instant::now();
    procs.quit.set(quit).unwrap();
    let assignments = scenario.assignments_during_overlap.then(|| {
        let procs = Arc::clone(&procs);
        let api = server.api;
        tokio::spawn(async move {
            // Once B answers too: four rounds of four users, each request on a new connection.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut asked = Vec::new();
            for _ in 0..4 {
                for i in 0..4 {
                    let procs = Arc::clone(&procs);
                    asked.push(tokio::spawn(async move {
                        let user = format!("u{i}");
                        let answer = assign(api, &procs, &user).await;
                        (user, answer)
                    }));
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            let mut answers = Vec::new();
            for a in asked {
                answers.push(a.await.unwrap());
            }
            answers
        })
    });
    let limit = CLOSE_TIMEOUT + GRACE + SHUTDOWN_TIMEOUT + Duration::from_secs(2);
    let a_status = loop {
        if let Some(status) = a.0.try_wait().unwrap() {
            break Some(status);
        }
        if quit.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let a_took = quit.elapsed();
    let a_gone = Instant::now();
    // B alone for a while, then new connections one by one: each must be B's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut last = Vec::new();
    for _ in 0..10 {
        let get = format!("GET /{}/headers HTTP/1.1\r\nHost: {host}\r\n\r\n", ids[0]);
        last.push(match TcpStream::connect(server.proxy).await {
            Err(e) => Err(format!("connecting: {e}")),
            Ok(mut stream) => match exchange(&mut stream, get.as_bytes()).await {
                Ok(200) => Ok(procs.who(&stream)),
                Ok(status) => Err(format!("status {status}")),
                Err(Failure::ClosedBeforeAnswer(e) | Failure::Other(e)) => Err(e),
            },
        });
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let mut reports = Vec::new();
    for s in sockets {
        reports.push(s.await.unwrap());
    }

    // Each user's answers during the overlap, then B's alone.
    let mut owners_wrong = Vec::new();
    if let Some(task) = assignments {
        let answers = task.await.unwrap();
        let mut named: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut holder: std::collections::BTreeMap<String, String> = Default::default();
        for (user, answer) in &answers {
            match answer {
                Ok((who, id)) => {
                    named
                        .entry(user.clone())
                        .or_default()
                        .push(format!("{who:?}:{id}"));
                    if let Some(other) = holder.insert(id.clone(), user.clone()) {
                        if &other != user {
                            owners_wrong.push(format!("{id} was named for {other} and {user}"));
                        }
                    }
                }
                Err(e) => owners_wrong.push(format!("{user}: {e}")),
            }
        }
        for (user, ids) in &named {
            let (_, body) = server
                .command("REQUEST_RSTUDIO", serde_json::json!({"userId": user}))
                .await;
            let then = body["instanceId"].as_str().unwrap_or_default();
            println!("assignments of {user} during the overlap: {ids:?}, then B: {then}");
            if ids.iter().any(|named| !named.ends_with(then)) {
                owners_wrong.push(format!("{user} was given {ids:?}, then {then}"));
            }
        }
    }

    // ---- The figures ----
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let from_quit = |t: Instant| {
        t.saturating_duration_since(quit).as_secs_f64()
            - quit.saturating_duration_since(t).as_secs_f64()
    };
    println!(
        "\ngraceful upgrade: B waited on the upgrade socket: {b_waited}; A exited {} after SIGQUIT ({}), limit {}",
        secs(a_took),
        a_status.map_or("still running".to_owned(), |s| s.to_string()),
        secs(CLOSE_TIMEOUT + GRACE + SHUTDOWN_TIMEOUT)
    );
    println!(
        "{:<16} {:<20} {:>6} {:>6} {:>7} {:>6} {:>6} {:>7}",
        "requests", "phase", "total", "failed", "retried", "by A", "by B", "unknown"
    );
    let phase_of = |t: Instant| match t {
        t if t < quit => 0,
        t if t < a_gone => 1,
        _ => 2,
    };
    for kind in [Kind::KeepAlive, Kind::NewConnection, Kind::LongPoll] {
        for (n, phase) in ["before SIGQUIT", "SIGQUIT..A exits", "after A exits"]
            .iter()
            .enumerate()
        {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.kind == kind && phase_of(s.at) == n)
                .collect();
            let count = |f: &dyn Fn(&Sample) -> bool| of.iter().filter(|s| f(s)).count();
            println!(
                "{:<16} {:<20} {:>6} {:>6} {:>7} {:>6} {:>6} {:>7}",
                format!("{kind:?}"),
                phase,
                of.len(),
                count(&|s| s.outcome.is_err()),
                count(&|s| s.retried.is_some()),
                count(&|s| s.who == Who::A),
                count(&|s| s.who == Who::B),
                count(&|s| s.who == Who::Unknown),
            );
        }
    }
    let failed: Vec<String> = samples
        .iter()
        .filter_map(|s| {
            let e = s.outcome.as_ref().err()?;
            Some(format!(
                "{:?} at {:+.2} s from SIGQUIT: {e}",
                s.kind,
                from_quit(s.at)
            ))
        })
        .collect();
    for s in samples.iter() {
        if let Some((who, e)) = &s.retried {
            println!(
                "retried: {:?} sent at {:+.2} s from SIGQUIT on a kept connection to {who:?}: {e}",
                s.kind,
                from_quit(s.at)
            );
        }
    }
    let grace_end = quit + CLOSE_TIMEOUT + GRACE;
    let kept = reports
        .iter()
        .filter(|r| {
            r.last_echo_before_end
                .is_some_and(|t| t + Duration::from_millis(500) >= grace_end)
        })
        .count();
    let ends: Vec<String> = reports
        .iter()
        .map(|r| match &r.ended {
            Some((at, how)) => format!(
                "{how} at +{:.2} s",
                at.saturating_duration_since(quit).as_secs_f64()
            ),
            None => "not ended".to_owned(),
        })
        .collect();
    let reconnected = reports
        .iter()
        .filter(|r| {
            !r.reconnected_to.is_empty()
                && r.reconnected_to.iter().all(|w| *w == Who::B)
                && r.echoes_after > 0
        })
        .count();
    println!(
        "websockets: {} opened on A before the upgrade; {kept} echoed until A's grace period ended (+{:.1} s); ended: {ends:?}; {reconnected} reconnected to B and echoed there ({} echoes)",
        reports.iter().filter(|r| r.opened_by == Some(Who::A)).count(),
        (CLOSE_TIMEOUT + GRACE).as_secs_f64(),
        reports.iter().map(|r| r.echoes_after).sum::<usize>(),
    );
    println!(
        "kept connections the server closed between two requests (seen before reuse): {}",
        closed_between.load(Ordering::Relaxed)
    );
    println!("new connections after A exited: {last:?}");

    // ---- What must hold ----
    assert!(
        owners_wrong.is_empty(),
        "assignments during the upgrade: {owners_wrong:#?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed; the first: {:#?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(10)]
    );
    for kind in [Kind::KeepAlive, Kind::NewConnection, Kind::LongPoll] {
        let overlap = samples
            .iter()
            .filter(|s| s.kind == kind && s.at >= quit && s.at < a_gone)
            .count();
        assert!(overlap > 0, "no {kind:?} request ran during the upgrade");
    }
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= a_gone).collect();
    assert!(
        after.iter().all(|s| s.who != Who::A),
        "A served requests after it exited"
    );
    assert!(
        after
            .iter()
            .any(|s| s.kind == Kind::NewConnection && s.who == Who::B),
        "B served no new connection after A exited"
    );
    assert!(
        last.iter().all(|w| *w == Ok(Who::B)),
        "a new connection after A exited was not B's: {last:?}"
    );
    for (n, r) in reports.iter().enumerate() {
        assert_eq!(r.opened_by, Some(Who::A), "socket {n} was not opened on A");
        assert!(r.failures.is_empty(), "socket {n}: {:?}", r.failures);
        assert!(r.ended.is_some(), "socket {n} opened on A never ended");
        assert!(
            !r.reconnected_to.is_empty() && r.reconnected_to.iter().all(|w| *w == Who::B),
            "socket {n} reconnected to {:?}",
            r.reconnected_to
        );
        assert!(r.echoes_after > 0, "socket {n} never echoed on B");
    }
    let a_status =
        a_status.unwrap_or_else(|| panic!("A did not exit within {} of SIGQUIT", secs(limit)));
    assert!(a_status.success(), "A exited with {a_status}");
    assert!(
        a_took <= CLOSE_TIMEOUT + GRACE + SHUTDOWN_TIMEOUT + Duration::from_millis(500),
        "A took {} to exit",
        secs(a_took)
    );
    assert!(b_waited, "B never listened on the upgrade socket");
    let b = server.pid().unwrap();
    assert!(alive(b), "B is not running");
    let health: serde_json::Value = server
        .client()
        .get(format!("http://{}/healthz", server.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["recovered"], true, "{health}");
    for (user, id) in users.iter().zip(&ids) {
        assert_eq!(
            &server.request(user).await,
            id,
            "{user} lost their instance"
        );
    }
    eventually(
        "B answers for every instance",
        Duration::from_secs(5),
        || async {
            for id in &ids {
                let (status, _) = server.page(&format!("/{id}/")).await;
                if status != 200 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    drop(a);
}

/// Two pool managers on one state folder would assign the same instances: a second
/// rstudio-pool started without `-u` is refused, naming the one that runs.
#[tokio::test]
async fn a_second_pool_on_the_same_state_folder_is_refused() {
    let server = Server::start(Options {
        min_free: 0,
        ..Options::default()
    })
    .await;
    let mut second = server.spawn_another(&[], "second.log");
    let status = eventually("the second one gives up", Duration::from_secs(20), || {
        let status = second.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(!status.success());
    let said = std::fs::read_to_string(server.dir.join("second.log")).unwrap();
    let pid = server.pid().unwrap();
    assert!(
        said.contains(&format!(
            "another rstudio-pool (pid {pid}) runs pool `test-pool`"
        )),
        "{said}"
    );
    // The first one is untouched.
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
}
