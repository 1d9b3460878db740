//! Assignment from the warm pool: N concurrent `REQUEST_RSTUDIO` for N new users while free
//! instances exist, timing each call. One line of JSON on stdout: p50, p99, max in ms, and
//! how many were served from a ready instance.
//!
//! The client is plain HTTP/1.1 over one kept-alive connection per caller, each request
//! rendered before the clock starts: on a 2-core machine the load program shares the cores
//! with the server, and a full HTTP client's own work showed up in the latencies it
//! measured (as wrk is lean C for the HTTP part).
//!
//! `api_load <api url> <callers> [bearer token]`; with `API_LOAD_FLOOR=1` the same burst is
//! `GET /healthz` instead, which does no pool work: the floor of the HTTP path.

use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status, body).
async fn response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, Vec<u8>)> {
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                if stream.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            return Some((status, buf[end + 4..end + 4 + length].to_vec()));
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

fn request(host: &str, path: &str, token: Option<&str>, body: &str) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (method, length) = if body.is_empty() {
        ("GET", String::new())
    } else {
        (
            "POST",
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ),
        )
    };
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{length}\r\n{body}").into_bytes()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: api_load <api url> <callers> [bearer token]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let callers: usize = args[2].parse().expect("a number of callers");
    let token = args.get(3).cloned();
    let authority = url
        .strip_prefix("http://")
        .expect("an http:// url")
        .trim_end_matches('/')
        .to_owned();
    // The floor: the same burst of calls that do no pool work (`GET /healthz`).
    let floor = std::env::var_os("API_LOAD_FLOOR").is_some();
    let run = format!("{:08x}", rand::random::<u32>());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(callers));
    let calls = (0..callers).map(|n| {
        let (authority, token, barrier) = (authority.clone(), token.clone(), barrier.clone());
        let user = format!("bench-{run}-{n}");
        tokio::spawn(async move {
            // Connected and warmed first, so that connection setup is not what is measured.
            let mut stream = TcpStream::connect(&authority).await.ok()?;
            let _ = stream.set_nodelay(true);
            let mut buf = Vec::with_capacity(4096);
            stream
                .write_all(&request(&authority, "/healthz", token.as_deref(), ""))
                .await
                .ok()?;
            response(&mut stream, &mut buf).await?;
            let body = json!({"command": "REQUEST_RSTUDIO", "payload": {"userId": user}});
            let call = if floor {
                request(&authority, "/healthz", token.as_deref(), "")
            } else {
                request(&authority, "/", token.as_deref(), &body.to_string())
            };
            barrier.wait().await;
            let started = Instant::now();
            stream.write_all(&call).await.ok()?;
            let answer = response(&mut stream, &mut buf).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let ready = match answer {
                Some((200, _)) if floor => Some(true),
                Some((200, body)) => serde_json::from_slice::<Value>(&body)
                    .ok()
                    .map(|v| v["ready"] == json!(true)),
                _ => None,
            };
            Some((ms, ready))
        })
    });
    let mut times = Vec::with_capacity(callers);
    let (mut ready, mut failed) = (0, 0);
    for result in futures_util::future::join_all(calls).await {
        let Some((ms, outcome)) = result.unwrap() else {
            failed += 1;
            continue;
        };
        times.push(ms);
        match outcome {
            Some(true) => ready += 1,
            Some(false) => {}
            None => failed += 1,
        }
    }
    assert!(!times.is_empty(), "no call was made: is the API up?");
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{{\"callers\":{callers},\"ready\":{ready},\"failed\":{failed},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    );
}
