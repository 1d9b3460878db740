//! Recovery, measured: the pool is killed with SIGKILL under steady HTTP load with a WebSocket
//! open per user, systemd's stand-in starts it again after the unit's `RestartSec=2`
//! (deploy/rstudio-pool.service), and the test reports how long the proxy was away, how many
//! requests failed meanwhile and over the whole run, and what became of the WebSockets.
//!
//! Asserted (never a duration): every user is answered by their own workspace whenever they
//! are answered at all, before, during and after the crash; nothing fails before the kill,
//! nor once every user has been served again; the kill closes every open WebSocket and each one reconnects and echoes, through the same
//! workspace; after the restart `REQUEST_RSTUDIO` gives every user the instance they had,
//! whose upstream and process are the ones from before (re-adopted, not replaced).
//!
//! The figures are printed as a markdown table: `cargo test --test recovery -- --nocapture`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, wait_ready, Options, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

const WAIT: Duration = Duration::from_secs(30);
/// Users, each with their own workspace and one open WebSocket.
const USERS: usize = 8;
/// Concurrent client loops, each cycling through the users' workspaces.
const LOOPS: usize = 4;
/// Each loop starts one request every `PACE` (a steady rate, whatever the answers).
const PACE: Duration = Duration::from_millis(20);
/// A request not answered by then counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Load before the kill: the baseline, which must be free of failures.
const BEFORE_KILL: Duration = Duration::from_secs(2);
/// systemd's `RestartSec=2` of deploy/rstudio-pool.service: the stand-in waits as long.
const RESTART_SEC: Duration = Duration::from_secs(2);
/// Load after every user was served again.
const TAIL: Duration = Duration::from_secs(2);
/// How often an open socket echoes, and how soon a closed one tries again (a browser's
/// reconnect back-off, shortened).
const WS_PACE: Duration = Duration::from_millis(250);
const WS_RETRY: Duration = Duration::from_millis(100);

/// One proxied request: when it started and ended (since the load began) and what came back.
struct Record {
    user: usize,
    start: Duration,
    end: Duration,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 200 from the user's own workspace (its instance id and upstream address).
    Served,
    /// A 200 from anything else: must never happen.
    WrongWorkspace(String),
    /// Another status, with the title of the page that came with it.
    Status(u16, String),
    Refused,
    Timeout,
    /// The connection broke mid-request (the server died under it).
    Broken,
}

impl Outcome {
    fn kind(&self) -> String {
        match self {
            Outcome::Served => "served".into(),
            Outcome::WrongWorkspace(what) => format!("WRONG WORKSPACE ({what})"),
            Outcome::Status(status, title) => format!("HTTP {status} \"{title}\""),
            Outcome::Refused => "connection refused".into(),
            Outcome::Timeout => format!("no answer within {REQUEST_TIMEOUT:?}"),
            Outcome::Broken => "connection broken mid-request".into(),
        }
    }
}

/// Who a user is and where their workspace is: the facts every answer is checked against.
#[derive(Clone)]
struct Target {
    id: String,
    upstream: String,
}

/// `GET /<id>/headers` through the proxy: the demo workspace answers its instance id and the
/// `Host` it received, which the proxy sets to the workspace's own address.
async fn probe(client: &reqwest::Client, proxy: &str, target: &Target) -> Outcome {
    let url = format!("http://{proxy}/{}/headers", target.id);
    let classify = |e: reqwest::Error| {
        if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_connect() {
            Outcome::Refused
        } else {
            Outcome::Broken
        }
    };
    let response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => return classify(e),
    };
    let status = response.status().as_u16();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return classify(e),
    };
    if status != 200 {
        let page = String::from_utf8_lossy(&body);
        let title = page
            .split_once("<title>")
            .and_then(|(_, rest)| rest.split_once("</title>"))
            .map(|(title, _)| title.to_owned())
            .unwrap_or_default();
        return Outcome::Status(status, title);
    }
    let Ok(echoed) = serde_json::from_slice::<Value>(&body) else {
        return Outcome::WrongWorkspace("not the demo workspace's answer".into());
    };
    let instance = echoed["instanceId"].as_str().unwrap_or_default();
    let host = echoed["headers"]["host"].as_str().unwrap_or_default();
    if instance == target.id && host == target.upstream {
        Outcome::Served
    } else {
        Outcome::WrongWorkspace(format!("{instance} at {host}"))
    }
}

/// One client loop: a request every `PACE`, user after user, until `stop`.
async fn load(
    lane: usize,
    proxy: String,
    targets: Arc<Vec<Target>>,
    t0: Instant,
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The lanes start spread over the users, so that every user is asked within two paces.
    let mut n = lane * targets.len() / LOOPS;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let user = n % targets.len();
        n += 1;
        let start = t0.elapsed();
        let outcome = probe(&client, &proxy, &targets[user]).await;
        let end = t0.elapsed();
        records.lock().unwrap().push(Record {
            user,
            start,
            end,
            outcome,
        });
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `text` and waits (at most 10 s) for the workspace to echo it.
async fn echo(socket: &mut Socket, text: &str) -> Result<(), String> {
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Err(_) => return Err("no echo within 10 s".into()),
            Ok(None) => return Err("closed before the echo".into()),
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(Some(Ok(Message::Text(reply)))) if reply.as_str() == text => return Ok(()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(other))) => return Err(format!("unexpected {other:?}")),
        }
    }
}

/// What happened to one user's WebSocket across the crash.
#[derive(Default)]
struct WsReport {
    echoes_before: u32,
    /// When (since the load began) the socket was seen closed, and how.
    closed_at: Duration,
    closed_how: String,
    /// When the first reconnect that echoed succeeded, after how many attempts.
    back_at: Duration,
    attempts: u32,
    /// Each failed attempt: what went wrong, and when it was seen.
    failed_attempts: Vec<(String, Duration)>,
    /// `Host` of the new handshake as the workspace received it: its own address.
    handshake_host: String,
}

/// Holds the open socket (echoing every `WS_PACE`) until it closes, then reconnects as a
/// browser's page would, every `WS_RETRY`, until a new socket echoes (at most `WAIT`).
async fn websocket(socket: Socket, url: String, user: usize, t0: Instant) -> WsReport {
    let mut report = WsReport::default();
    let (mut sink, mut stream) = socket.split();
    let mut tick = tokio::time::interval(WS_PACE);
    let mut sent = 0u32;
    let mut outstanding: Option<String> = None;
    report.closed_how = loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) if outstanding.as_deref() == Some(text.as_str()) => {
                    report.echoes_before += 1;
                    outstanding = None;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => break format!("close frame {frame:?}"),
                Some(Ok(other)) => break format!("unexpected {other:?}"),
                Some(Err(e)) => break format!("error: {e}"),
                None => break "end of stream".into(),
            },
            _ = tick.tick() => {
                if outstanding.is_none() {
                    sent += 1;
                    let text = format!("user{user}-{sent}");
                    if let Err(e) = sink.send(Message::text(text.clone())).await {
                        break format!("send failed: {e}");
                    }
                    outstanding = Some(text);
                }
            }
        }
    };
    report.closed_at = t0.elapsed();

    let until = Instant::now() + WAIT;
    loop {
        report.attempts += 1;
        let failure = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        {
            Err(_) => format!("no handshake answer within {REQUEST_TIMEOUT:?}"),
            Ok(Err(tungstenite::Error::Http(response))) => {
                format!("handshake answered HTTP {}", response.status().as_u16())
            }
            Ok(Err(tungstenite::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                "connection refused".into()
            }
            Ok(Err(e)) => format!("handshake failed: {e}"),
            Ok(Ok((mut socket, _))) => match echo(&mut socket, &format!("user{user}-back")).await {
                Ok(()) => {
                    report.back_at = t0.elapsed();
                    // The handshake's headers as the workspace received them.
                    socket.send(Message::text("?headers")).await.unwrap();
                    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
                        .await
                        .expect("the handshake's headers within 10 s")
                        .expect("the socket is open")
                        .expect("a message");
                    let headers: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
                    report.handshake_host = headers["host"].as_str().unwrap_or_default().into();
                    let _ = socket.close(None).await;
                    return report;
                }
                Err(e) => format!("opened, but no echo: {e}"),
            },
        };
        report.failed_attempts.push((failure, t0.elapsed()));
        if Instant::now() > until {
            let mut tally = Tally::default();
            for (kind, at) in &report.failed_attempts {
                tally.add(kind.clone(), *at);
            }
            panic!(
                "user{user}'s WebSocket did not come back within {WAIT:?}: {}",
                tally.show(report.closed_at)
            );
        }
        tokio::time::sleep(WS_RETRY).await;
    }
}

/// Occurrences of each kind of failure, with the first and the last time it was seen.
#[derive(Default)]
struct Tally(BTreeMap<String, (usize, Duration, Duration)>);

impl Tally {
    fn add(&mut self, kind: String, at: Duration) {
        let entry = self.0.entry(kind).or_insert((0, at, at));
        entry.0 += 1;
        entry.1 = entry.1.min(at);
        entry.2 = entry.2.max(at);
    }

    /// `kind: n (+first … +last)`, times since `zero`.
    fn show(&self, zero: Duration) -> String {
        let since = |at: Duration| {
            let (sign, d) = match at.checked_sub(zero) {
                Some(d) => ('+', d),
                None => ('-', zero - at),
            };
            format!("{sign}{:.3} s", d.as_secs_f64())
        };
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(kind, (n, first, last))| {
                format!("{kind}: {n} ({} … {})", since(*first), since(*last))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Median and maximum time to answer of the served requests among `records`.
fn latency<'a>(records: impl Iterator<Item = &'a Record>) -> String {
    let mut took: Vec<Duration> = records
        .filter(|r| r.outcome == Outcome::Served)
        .map(|r| r.end - r.start)
        .collect();
    took.sort();
    match (took.get(took.len() / 2), took.last()) {
        (Some(median), Some(max)) => format!(
            "{:.1} / {:.1} ms",
            median.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0
        ),
        _ => "none served".into(),
    }
}

fn failed(r: &Record) -> bool {
    r.outcome != Outcome::Served
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn share(failed: usize, of: usize) -> String {
    format!(
        "{failed} of {of} ({:.1} %)",
        100.0 * failed as f64 / of.max(1) as f64
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pool_restarts_under_load_and_every_user_keeps_their_workspace() {
    let mut server = Server::start(Options {
        min_free: 1,
        max: USERS + 2,
        ..Options::default()
    })
    .await;
    let proxy = server.proxy.to_string();

    // Every user gets a workspace, ready, behind a known upstream and process.
    let users: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    let mut targets = Vec::new();
    for user in &users {
        let id = server.request(user).await;
        targets.push(Target {
            upstream: String::new(),
            id,
        });
    }
    for target in &mut targets {
        wait_ready(&server, &target.id).await;
        target.upstream = server.upstream(&target.id).await;
    }
    let processes_before: HashMap<String, u32> = server
        .workspaces()
        .into_iter()
        .map(|(pid, id)| (id, pid))
        .collect();
    for target in &targets {
        assert!(
            processes_before.contains_key(&target.id),
            "no process for {}",
            target.id
        );
    }
    let targets = Arc::new(targets);

    // A WebSocket per user, checked with one echo, then kept busy by its own task.
    let t0 = Instant::now();
    let mut sockets = Vec::new();
    for (user, target) in targets.iter().enumerate() {
        let url = format!("ws://{proxy}/{}/ws", target.id);
        let (mut socket, response) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 101);
        echo(&mut socket, "open").await.unwrap();
        sockets.push(tokio::spawn(websocket(socket, url, user, t0)));
    }

    // Steady load.
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..LOOPS)
        .map(|lane| {
            tokio::spawn(load(
                lane,
                proxy.clone(),
                Arc::clone(&targets),
                t0,
                Arc::clone(&records),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let load_from = t0.elapsed();
    // Load pacing: the baseline before the crash.
    tokio::time::sleep(BEFORE_KILL).await;

    // The crash, then systemd's stand-in: RestartSec, then the same binary, configuration,
    // ports and STATE_DIR.
    let killed_at = t0.elapsed();
    let killed = Instant::now();
    server.kill9();
    tokio::time::sleep_until((killed + RESTART_SEC).into()).await;
    let restarted_at = t0.elapsed();
    server.restart().await; // returns once /healthz says recovered
    let recovered_at = t0.elapsed();

    // Until every user's workspace is served again through the proxy.
    let first_served_after = |records: &[Record], user: Option<usize>| {
        records
            .iter()
            .filter(|r| r.start >= killed_at && r.outcome == Outcome::Served)
            .filter(|r| user.is_none_or(|u| r.user == u))
            .map(|r| r.end)
            .min()
    };
    let back: Vec<Duration> = eventually(
        "every user's workspace is served through the proxy again",
        WAIT,
        || {
            let records = records.lock().unwrap();
            let back: Option<Vec<Duration>> = (0..USERS)
                .map(|u| first_served_after(&records, Some(u)))
                .collect();
            std::future::ready(back)
        },
    )
    .await;
    let all_back_at = *back.iter().max().unwrap();
    // Load pacing: the tail after the recovery.
    tokio::time::sleep(TAIL).await;
    stop.store(true, Ordering::SeqCst);
    for handle in loops {
        handle.await.unwrap();
    }
    let load_until = t0.elapsed();

    // Every WebSocket was closed by the kill (not before) and came back through the same
    // workspace.
    eventually("every WebSocket is back", WAIT, || {
        std::future::ready(sockets.iter().all(|s| s.is_finished()).then_some(()))
    })
    .await;
    let mut ws = Vec::new();
    for handle in sockets {
        ws.push(handle.await.unwrap());
    }
    for (user, report) in ws.iter().enumerate() {
        assert!(
            report.closed_at >= killed_at,
            "user{user}'s WebSocket closed before the kill: {}",
            report.closed_how
        );
        assert!(
            report.echoes_before > 0,
            "user{user}'s WebSocket never echoed before the kill"
        );
        assert_eq!(
            report.handshake_host, targets[user].upstream,
            "user{user}'s WebSocket came back through another workspace"
        );
    }

    // The same instance for every user, with the same upstream and the same process.
    let processes_after: HashMap<String, u32> = server
        .workspaces()
        .into_iter()
        .map(|(pid, id)| (id, pid))
        .collect();
    for (user, target) in users.iter().zip(targets.iter()) {
        assert_eq!(
            server.request(user).await,
            target.id,
            "{user} got another instance after the restart"
        );
        assert_eq!(
            server.upstream(&target.id).await,
            target.upstream,
            "{user}'s instance has another upstream after the restart"
        );
        assert_eq!(
            processes_after.get(&target.id),
            processes_before.get(&target.id),
            "{user}'s workspace process was replaced"
        );
        let client = reqwest::Client::new();
        assert_eq!(
            probe(&client, &proxy, target).await,
            Outcome::Served,
            "{user}'s workspace does not answer as itself"
        );
    }

    // The figures.
    let records = records.lock().unwrap();
    let wrong: Vec<String> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::WrongWorkspace(what) => Some(format!("user{}: {what}", r.user)),
            _ => None,
        })
        .collect();
    // Three windows, each request in one: answered before the kill; in flight at the kill or
    // started before every user was served again (the outage); started after that.
    let before: Vec<&Record> = records.iter().filter(|r| r.end < killed_at).collect();
    let outage: Vec<&Record> = records
        .iter()
        .filter(|r| r.end >= killed_at && r.start < all_back_at)
        .collect();
    let after: Vec<&Record> = records.iter().filter(|r| r.start >= all_back_at).collect();
    assert_eq!(before.len() + outage.len() + after.len(), records.len());
    let mut kinds = Tally::default();
    for r in records.iter().filter(|r| failed(r)) {
        kinds.add(r.outcome.kind(), r.end);
    }
    let mut ws_kinds = Tally::default();
    let mut closed_how: BTreeMap<String, u32> = BTreeMap::new();
    for report in &ws {
        for (kind, at) in &report.failed_attempts {
            ws_kinds.add(kind.clone(), *at);
        }
        *closed_how.entry(report.closed_how.clone()).or_default() += 1;
    }
    let first_back = first_served_after(&records, None).unwrap();
    let last_failure = records
        .iter()
        .filter(|r| failed(r))
        .map(|r| r.end)
        .max()
        .unwrap_or_default();
    let ws_closed = ws.iter().map(|r| r.closed_at).max().unwrap();
    let ws_back = ws.iter().map(|r| r.back_at).max().unwrap();
    let ws_first_back = ws.iter().map(|r| r.back_at).min().unwrap();
    let span = load_until - load_from;
    let since_kill = |at: Duration| secs(at - killed_at);
    let rows: Vec<(String, String)> = vec![
        (
            "users / open WebSockets".into(),
            format!("{USERS} / {USERS}"),
        ),
        (
            "load".into(),
            format!(
                "{LOOPS} loops, a GET every {PACE:?} each, {:.0} requests/s measured over {}",
                records.len() as f64 / span.as_secs_f64(),
                secs(span)
            ),
        ),
        (
            "RestartSec (stand-in's wait, included below)".into(),
            secs(RESTART_SEC),
        ),
        (
            "kill → every WebSocket seen closed".into(),
            since_kill(ws_closed),
        ),
        (
            "kill → restart (process spawned)".into(),
            since_kill(restarted_at),
        ),
        (
            "restart → /healthz says recovered".into(),
            secs(recovered_at - restarted_at),
        ),
        (
            "kill → first proxied request served".into(),
            format!(
                "{} (restart + {})",
                since_kill(first_back),
                secs(first_back - restarted_at)
            ),
        ),
        (
            "kill → every user's workspace served".into(),
            format!(
                "{} (restart + {})",
                since_kill(all_back_at),
                secs(all_back_at - restarted_at)
            ),
        ),
        (
            "each user's first served request after the restart (sorted)".into(),
            {
                let mut back: Vec<Duration> = back.iter().map(|b| *b - restarted_at).collect();
                back.sort();
                back.iter()
                    .map(|b| format!("{:.0}", b.as_secs_f64() * 1000.0))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + " ms"
            },
        ),
        (
            "kill → first / every WebSocket reconnected and echoing".into(),
            format!(
                "{} / {} (restart + {})",
                since_kill(ws_first_back),
                since_kill(ws_back),
                secs(ws_back - restarted_at)
            ),
        ),
        (
            "latency of served requests, median / max: before the kill; after the restart".into(),
            format!(
                "{}; {}",
                latency(before.iter().copied()),
                latency(records.iter().filter(|r| r.start >= restarted_at)),
            ),
        ),
        (
            "kill → last failed request answered".into(),
            since_kill(last_failure),
        ),
        (
            "requests failed among those answered before the kill".into(),
            share(before.iter().filter(|r| failed(r)).count(), before.len()),
        ),
        (
            "requests failed in the outage (in flight at the kill, or started before every user was served)".into(),
            share(outage.iter().filter(|r| failed(r)).count(), outage.len()),
        ),
        (
            "requests failed after every user was served again".into(),
            share(after.iter().filter(|r| failed(r)).count(), after.len()),
        ),
        (
            "requests failed over the whole run".into(),
            share(records.iter().filter(|r| failed(r)).count(), records.len()),
        ),
        (
            "failed requests by kind (answered from … to, since the kill)".into(),
            kinds.show(killed_at),
        ),
        (
            "requests answered by a wrong workspace".into(),
            wrong.len().to_string(),
        ),
        ("how the WebSockets ended".into(), format!("{closed_how:?}")),
        (
            "failed WebSocket reconnects by kind (from … to, since the kill)".into(),
            ws_kinds.show(killed_at),
        ),
    ];
    println!("\n| recovery after `kill -9` | |\n|---|---|");
    for (figure, value) in &rows {
        println!("| {figure} | {} |", value.replace('|', "\\|"));
    }
    println!();

    assert!(wrong.is_empty(), "answered by a wrong workspace: {wrong:?}");
    assert_eq!(
        before.iter().filter(|r| failed(r)).count(),
        0,
        "requests failed before the kill"
    );
    // Once every user was served again, the pool stays up: nothing fails any more.
    assert_eq!(
        after.iter().filter(|r| failed(r)).count(),
        0,
        "requests failed after every user was served again: {}",
        kinds.show(killed_at)
    );
}
