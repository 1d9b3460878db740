//! The slow-client part of the load benchmark ("slowloris"): N connections each send a
//! request head one byte a second and never finish it, while a normal user asks for a page
//! 20 times a second, and we report how promptly the normal user was served.
//!
//! `slow_clients <host:port> <path> <cookie|-> <slow clients> <seconds> [requests a second]`
//!
//! The slow connections are opened 500 at a time; each sends `GET <path> HTTP/1.1`, a Host
//! header and then header lines without end, one byte a second. When the proxy closes one
//! (with a 408 or without an answer) it is counted and opened again at once, as an attacker
//! would. Once all are open, the normal user makes sequential requests for `<path>` with the
//! cookie for `<seconds>`, every other one on its kept-alive connection and every other one
//! on a new connection, and the clock for each runs from before the connect (new connection)
//! or the write (kept-alive) to the last byte of the answer; a request fails on a connect or
//! I/O error, an answer other than 200, or no whole answer within 10 s. With 0 slow clients
//! it is the baseline. The normal user runs on a thread and runtime of its own so that the
//! slow clients' timers do not delay its measurements.
//!
//! One line of JSON on stdout.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};

/// Slow connections opened at a time.
const RAMP: usize = 500;
/// A normal-user request without a whole answer in this long has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most answer bytes the normal user keeps (the upstream's answer is 25 bytes).
const MAX_ANSWER: usize = 1 << 20;

#[derive(Default)]
struct SlowStats {
    open: AtomicUsize,
    peak: AtomicUsize,
    opened: AtomicUsize,
    connect_failed: AtomicUsize,
    /// Closed by the proxy: reset, end of stream, or an answer and then the end.
    closed: AtomicUsize,
    closed_408: AtomicUsize,
    closed_503: AtomicUsize,
    closed_other_answer: AtomicUsize,
    /// How long the closed ones had been open, in ms: least and most.
    lived_min_ms: AtomicU64,
    lived_max_ms: AtomicU64,
}

enum End {
    Stopped,
    /// Closed by the proxy, with the status it answered first, if any.
    Closed(Option<u16>),
}

/// The `k`th byte a slow client sends: the request line and Host, then header lines forever.
fn head_byte(prefix: &[u8], k: usize) -> u8 {
    const FILLER: &[u8] = b"X-Slow: 1\r\n";
    match prefix.get(k) {
        Some(b) => *b,
        None => FILLER[(k - prefix.len()) % FILLER.len()],
    }
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// One slow client: opens, dribbles, and opens again whenever the proxy closes it.
async fn slow_client(
    addr: Arc<str>,
    prefix: Arc<[u8]>,
    stats: Arc<SlowStats>,
    opening: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    mut first: Option<oneshot::Sender<()>>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = {
            let permit = tokio::select! {
                p = opening.acquire() => p,
                _ = stopped(&mut stop) => return,
            };
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*addr)).await;
            drop(permit);
            connected
        };
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        let mut stream = match connected {
            Ok(Ok(stream)) => stream,
            _ => {
                stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopped(&mut stop) => return,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let now_open = stats.open.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak.fetch_max(now_open, Ordering::Relaxed);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let opened_at = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0usize;
        let mut buf = [0u8; 256];
        let end = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break End::Stopped,
                _ = tick.tick() => {
                    let byte = [head_byte(&prefix, sent)];
                    sent += 1;
                    if stream.write_all(&byte).await.is_err() {
                        break End::Closed(None);
                    }
                }
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break End::Closed(None),
                    Ok(n) => {
                        let status = status_of(&buf[..n]);
                        // The answer, then the end: wait a little for the end, reading no more
                        // than a bounded amount.
                        let mut left = 64 * 1024usize;
                        let until = Instant::now() + Duration::from_secs(5);
                        while left > 0 {
                            match tokio::time::timeout_at(until.into(), stream.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                                _ => break,
                            }
                        }
                        break End::Closed(Some(status.unwrap_or(0)));
                    }
                },
            }
        };
        stats.open.fetch_sub(1, Ordering::Relaxed);
        drop(stream);
        let status = match end {
            End::Stopped => return,
            End::Closed(status) => status,
        };
        let lived = opened_at.elapsed();
        let lived_ms = lived.as_millis() as u64;
        stats.closed.fetch_add(1, Ordering::Relaxed);
        match status {
            Some(408) => stats.closed_408.fetch_add(1, Ordering::Relaxed),
            Some(503) => stats.closed_503.fetch_add(1, Ordering::Relaxed),
            Some(_) => stats.closed_other_answer.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        stats.lived_min_ms.fetch_min(lived_ms, Ordering::Relaxed);
        stats.lived_max_ms.fetch_max(lived_ms, Ordering::Relaxed);
        // Closed at once (at the connection limit, say): not in a tight loop.
        if lived < Duration::from_secs(1) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

#[derive(Default)]
struct UserStats {
    latencies_ms: Vec<f64>,
    keepalive_ms: Vec<f64>,
    new_conn_ms: Vec<f64>,
    failed_connect: usize,
    failed_status: usize,
    failed_io: usize,
    failed_timeout: usize,
    /// A few of the failures, said.
    examples: Vec<String>,
}

enum Failure {
    Connect(String),
    Status(u16),
    Io(String),
}

/// Reads one whole answer (Content-Length, chunked, or to the end): its status and whether
/// the connection may be used again.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool), Failure> {
    buf.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = res.code.unwrap_or(0);
                let mut length = None;
                let mut chunked = false;
                let mut close = res.version == Some(0);
                for h in res.headers.iter() {
                    let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse::<usize>().ok();
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = value.contains("chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = value.contains("close");
                    }
                }
                let body_done = |buf: &Vec<u8>| -> bool {
                    if chunked {
                        buf[len..].ends_with(b"0\r\n\r\n")
                    } else if let Some(length) = length {
                        buf.len() >= len + length
                    } else {
                        false
                    }
                };
                let to_end = !chunked && length.is_none() && !(status == 204 || status == 304);
                let no_body = status == 204 || status == 304 || (status / 100 == 1);
                while !no_body && !body_done(buf) {
                    if buf.len() > MAX_ANSWER {
                        return Err(Failure::Io("answer too long".into()));
                    }
                    match stream.read_buf(buf).await {
                        Ok(0) if to_end => return Ok((status, false)),
                        Ok(0) => return Err(Failure::Io("closed in the body".into())),
                        Ok(_) => {}
                        Err(e) => return Err(Failure::Io(e.to_string())),
                    }
                }
                return Ok((status, !close && !to_end));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Failure::Io(format!("bad answer: {e}"))),
        }
        if buf.len() > MAX_ANSWER {
            return Err(Failure::Io("answer head too long".into()));
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err(Failure::Io("closed before an answer".into())),
            Ok(_) => {}
            Err(e) => return Err(Failure::Io(e.to_string())),
        }
    }
}

/// One normal-user request, on `kept` when given (and kept afterwards when it may be).
async fn one_request(
    addr: &str,
    request: &[u8],
    kept: &mut Option<TcpStream>,
    keepalive: bool,
    buf: &mut Vec<u8>,
) -> Result<(), Failure> {
    let mut stream = match kept.take().filter(|_| keepalive) {
        Some(stream) => stream,
        None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                stream
            }
            Ok(Err(e)) => return Err(Failure::Connect(e.to_string())),
            Err(_) => return Err(Failure::Connect("timed out".into())),
        },
    };
    if let Err(e) = stream.write_all(request).await {
        return Err(Failure::Io(e.to_string()));
    }
    let (status, reusable) = read_answer(&mut stream, buf).await?;
    if status != 200 {
        return Err(Failure::Status(status));
    }
    if keepalive && reusable {
        *kept = Some(stream);
    }
    Ok(())
}

async fn normal_user(addr: String, request: Vec<u8>, seconds: u64, rate: f64) -> UserStats {
    let mut stats = UserStats::default();
    let cap = ((seconds as f64 * rate) as usize + 16).min(1_000_000);
    stats.latencies_ms.reserve(cap);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut kept: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        let keepalive = n.is_multiple_of(2);
        n += 1;
        let started = Instant::now();
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            one_request(&addr, &request, &mut kept, keepalive, &mut buf),
        )
        .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(Failure::Connect(e))) => {
                stats.failed_connect += 1;
                Some(format!("connect: {e}"))
            }
            Ok(Err(Failure::Status(s))) => {
                stats.failed_status += 1;
                Some(format!("status {s}"))
            }
            Ok(Err(Failure::Io(e))) => {
                stats.failed_io += 1;
                Some(e)
            }
            Err(_) => {
                stats.failed_timeout += 1;
                Some(format!(
                    "no whole answer in {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            }
        };
        match failure {
            None => {
                if stats.latencies_ms.len() < cap {
                    stats.latencies_ms.push(ms);
                    if keepalive {
                        stats.keepalive_ms.push(ms);
                    } else {
                        stats.new_conn_ms.push(ms);
                    }
                }
            }
            Some(what) => {
                kept = None;
                if stats.examples.len() < 5 {
                    let mode = if keepalive {
                        "kept-alive"
                    } else {
                        "new connection"
                    };
                    stats
                        .examples
                        .push(format!("{mode}: {what} after {ms:.0} ms"));
                }
            }
        }
    }
    stats
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// As many open files as the hard limit allows (load.sh raises it too).
fn raise_open_files() {
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: slow_clients <host:port> <path> <cookie|-> <slow clients> <seconds> [requests a second]"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        usage();
    }
    let addr = args[1].clone();
    let path = args[2].clone();
    let cookie = Some(args[3].clone()).filter(|c| !c.is_empty() && c != "-");
    let Ok(slow) = args[4].parse::<usize>() else {
        usage()
    };
    let Ok(seconds) = args[5].parse::<u64>() else {
        usage()
    };
    let rate: f64 = match args.get(6) {
        Some(r) => match r.parse() {
            Ok(r) if r > 0.0 => r,
            _ => usage(),
        },
        None => 20.0,
    };
    raise_open_files();

    let cookie_line = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slow_clients-normal-user\r\n\
         Accept: */*\r\n{cookie_line}\r\n"
    )
    .into_bytes();
    let prefix: Arc<[u8]> =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slow_clients\r\n")
            .into_bytes()
            .into();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slow_clients: no runtime: {e}");
            std::process::exit(1);
        }
    };
    let stats = Arc::new(SlowStats {
        lived_min_ms: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let (tasks, ramp_s, user) = runtime.block_on(async {
        let addr_arc: Arc<str> = addr.clone().into();
        let opening = Arc::new(Semaphore::new(RAMP));
        let mut tasks = Vec::with_capacity(slow);
        let mut spawned = 0;
        while spawned < slow {
            let batch = RAMP.min(slow - spawned);
            let mut firsts = Vec::with_capacity(batch);
            for _ in 0..batch {
                let (tx, rx) = oneshot::channel();
                firsts.push(rx);
                tasks.push(tokio::spawn(slow_client(
                    addr_arc.clone(),
                    prefix.clone(),
                    stats.clone(),
                    opening.clone(),
                    stop_rx.clone(),
                    Some(tx),
                )));
            }
            spawned += batch;
            for rx in firsts {
                let _ = rx.await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ramp_s = started.elapsed().as_secs_f64();
        if slow > 0 {
            eprintln!(
                "slow_clients: {} slow connections open ({} failed to open) in {ramp_s:.1} s",
                stats.open.load(Ordering::Relaxed),
                stats.connect_failed.load(Ordering::Relaxed)
            );
        }
        // The normal user, on a thread of its own.
        let (user_tx, user_rx) = oneshot::channel();
        let (user_addr, user_request) = (addr.clone(), request.clone());
        let spawned_thread = std::thread::Builder::new()
            .name("normal-user".into())
            .spawn(move || {
                let stats = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(normal_user(user_addr, user_request, seconds, rate)));
                let _ = user_tx.send(stats.ok());
            });
        let user = match spawned_thread {
            Ok(_) => user_rx.await.ok().flatten(),
            Err(_) => None,
        };
        let _ = stop_tx.send(true);
        (tasks, ramp_s, user)
    });
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    });
    let Some(user) = user else {
        eprintln!("slow_clients: the normal user did not run");
        std::process::exit(1);
    };
    for e in &user.examples {
        eprintln!("slow_clients: normal user failed: {e}");
    }
    let failed = user.failed_connect + user.failed_status + user.failed_io + user.failed_timeout;
    let all = sorted(user.latencies_ms);
    let kept = sorted(user.keepalive_ms);
    let fresh = sorted(user.new_conn_ms);
    let lived_min = stats.lived_min_ms.load(Ordering::Relaxed);
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v:.3}")
        } else {
            "null".into()
        }
    };
    println!(
        "{{\"slow\":{slow},\"seconds\":{seconds},\"rate\":{rate},\"ramp_s\":{ramp_s:.2},\
         \"peak_open\":{},\"open_at_end\":{},\"opened\":{},\"connect_failed\":{},\
         \"closed\":{},\"closed_408\":{},\"closed_503\":{},\"closed_other_answer\":{},\
         \"closed_after_min_s\":{},\"closed_after_max_s\":{},\
         \"requests\":{},\"failed\":{failed},\"failed_connect\":{},\"failed_status\":{},\
         \"failed_io\":{},\"failed_timeout\":{},\
         \"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\
         \"keepalive_p50_ms\":{},\"keepalive_p99_ms\":{},\"new_conn_p50_ms\":{},\"new_conn_p99_ms\":{}}}",
        stats.peak.load(Ordering::Relaxed),
        stats.open.load(Ordering::Relaxed),
        stats.opened.load(Ordering::Relaxed),
        stats.connect_failed.load(Ordering::Relaxed),
        stats.closed.load(Ordering::Relaxed),
        stats.closed_408.load(Ordering::Relaxed),
        stats.closed_503.load(Ordering::Relaxed),
        stats.closed_other_answer.load(Ordering::Relaxed),
        if lived_min == u64::MAX { "null".into() } else { format!("{:.1}", lived_min as f64 / 1000.0) },
        if lived_min == u64::MAX { "null".into() } else { format!("{:.1}", stats.lived_max_ms.load(Ordering::Relaxed) as f64 / 1000.0) },
        all.len() + failed,
        user.failed_connect,
        user.failed_status,
        user.failed_io,
        user.failed_timeout,
        num(percentile(&all, 0.50)),
        num(percentile(&all, 0.99)),
        num(all.last().copied().unwrap_or(f64::NAN)),
        num(percentile(&kept, 0.50)),
        num(percentile(&kept, 0.99)),
        num(percentile(&fresh, 0.50)),
        num(percentile(&fresh, 0.99)),
    );
    // The slow clients' sockets close with the process.
    drop(runtime);
}
