//! Assignment from the warm pool: N concurrent `REQUEST_RSTUDIO` for N new users while free
//! instances exist, timing each call. One line of JSON on stdout: p50, p99, max in ms, and
//! how many were served from a ready instance.
//!
//! `api_load <api url> <callers> [bearer token]`

use std::time::Instant;

use serde_json::{json, Value};

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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(callers)
        .build()
        .unwrap();
    // Warm the connections first, so that connection setup is not what is measured.
    let warm = (0..callers).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let _ = client.get(format!("{url}healthz")).send().await;
        }
    });
    futures_util::future::join_all(warm).await;
    let run = format!("{:08x}", rand::random::<u32>());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(callers));
    let calls = (0..callers).map(|n| {
        let (client, url, token, barrier) =
            (client.clone(), url.clone(), token.clone(), barrier.clone());
        let user = format!("bench-{run}-{n}");
        tokio::spawn(async move {
            barrier.wait().await;
            let mut request = client
                .post(&url)
                .json(&json!({"command": "REQUEST_RSTUDIO", "payload": {"userId": user}}));
            if let Some(t) = &token {
                request = request.bearer_auth(t);
            }
            let started = Instant::now();
            let response = request.send().await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let ready = match response {
                Ok(r) if r.status().is_success() => r
                    .json::<Value>()
                    .await
                    .ok()
                    .map(|v| v["ready"] == json!(true)),
                _ => None,
            };
            (ms, ready)
        })
    });
    let mut times = Vec::with_capacity(callers);
    let (mut ready, mut failed) = (0, 0);
    for result in futures_util::future::join_all(calls).await {
        let (ms, outcome) = result.unwrap();
        times.push(ms);
        match outcome {
            Some(true) => ready += 1,
            Some(false) => {}
            None => failed += 1,
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{{\"callers\":{callers},\"ready\":{ready},\"failed\":{failed},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    );
}
