//! The WebSocket part of the load benchmark: opens N sockets through a proxy to an echo
//! endpoint, has each send one small message a second, and reports the echo round trip
//! (p50, p99), and how many sockets failed to open or dropped. One line of JSON on stdout.
//!
//! `ws_load <ws url> <sockets> <seconds> [cookie]`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: ws_load <ws url> <sockets> <seconds> [cookie]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let sockets: usize = args[2].parse().expect("a number of sockets");
    let seconds: u64 = args[3].parse().expect("a number of seconds");
    let cookie = args.get(4).cloned();

    let rtts = Arc::new(Mutex::new(Vec::<f64>::with_capacity(
        sockets * seconds as usize,
    )));
    let failed = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    // Open at most 200 at a time: a connect storm measures the listen backlog, not the proxy.
    let opening = Arc::new(tokio::sync::Semaphore::new(200));
    let all_open = Arc::new(tokio::sync::Barrier::new(sockets + 1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(sockets);
    for n in 0..sockets {
        let (url, cookie) = (url.clone(), cookie.clone());
        let (rtts, failed, dropped, open) =
            (rtts.clone(), failed.clone(), dropped.clone(), open.clone());
        let (opening, all_open) = (opening.clone(), all_open.clone());
        tasks.push(tokio::spawn(async move {
            let mut request = url.into_client_request().expect("a ws:// url");
            if let Some(c) = cookie {
                request
                    .headers_mut()
                    .insert("cookie", c.parse().expect("a cookie header"));
            }
            let permit = opening.acquire().await;
            let connected = tokio::time::timeout(
                Duration::from_secs(30),
                tokio_tungstenite::connect_async(request),
            )
            .await;
            drop(permit);
            let mut socket = match connected {
                Ok(Ok((socket, _))) => {
                    open.fetch_add(1, Ordering::Relaxed);
                    Some(socket)
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            all_open.wait().await;
            let Some(socket) = socket.as_mut() else {
                return;
            };
            // Spread the sends over the second.
            tokio::time::sleep(Duration::from_millis((n as u64 * 997) % 1000)).await;
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while Instant::now() < until {
                tick.tick().await;
                let sent = Instant::now();
                if socket
                    .send(Message::text(format!("ping {n}")))
                    .await
                    .is_err()
                {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
                    Ok(Some(Ok(_))) => {
                        rtts.lock()
                            .unwrap()
                            .push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            let _ = socket.close(None).await;
        }));
    }
    all_open.wait().await;
    let opened_in = started.elapsed().as_secs_f64();
    eprintln!(
        "ws_load: {} open, {} failed in {opened_in:.1} s",
        open.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    // The script reads the proxy's memory now, with every socket open.
    println!(
        "{{\"event\":\"open\",\"open\":{}}}",
        open.load(Ordering::Relaxed)
    );
    for t in tasks {
        let _ = t.await;
    }
    let mut rtts = rtts.lock().unwrap().clone();
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"event\":\"done\",\"sockets\":{sockets},\"open\":{},\"failed\":{},\"dropped\":{},\"echoes\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        open.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        rtts.len(),
        percentile(&rtts, 0.50),
        percentile(&rtts, 0.99)
    );
}
