//! Several purposes side by side, JupyterLab as a real third-party workload, the progress
//! page, and starts that fail (issue 6).

mod common;

use std::time::{Duration, Instant};

use common::{eventually, is_known, is_running, path_with_venv, wait_ready, Options, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn two_purposes_keep_their_own_sizes_and_timeouts() {
    let server = Server::start(Options {
        min_free: 1,
        max: 3,
        timeout_instance_ms: 3000,
        env: vec![path_with_venv()],
        extra_yaml: "purposes:\n  jupyter:\n    min_free_instances: 1\n    max_instances: 2\n    timeout_instance_ms: 600000\n".into(),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "ana", "purpose": "cobol"}),
        )
        .await;
    assert_eq!(status, 400);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("`jupyter`") && message.contains("`rstudio`"),
        "{message}"
    );

    // JupyterLab first: RStudio's 3 s idle timeout would cull it while we wait for JupyterLab.
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "ana", "purpose": "jupyter", "wait": 60}),
        )
        .await;
    let rstudio = server.request("ana").await;
    assert_eq!(status, 200, "{body}");
    let jupyter = body["instanceId"].as_str().unwrap().to_owned();
    assert_eq!(body["ready"], json!(true), "waited for readiness: {body}");
    assert_ne!(rstudio, jupyter, "one instance per purpose");
    assert_eq!(
        server
            .command("GET_STATUS", json!({"instanceId": jupyter}))
            .await
            .1["instance"]["Purpose"],
        json!("jupyter")
    );
    assert_eq!(
        server
            .command("GET_STATUS", json!({"instanceId": rstudio}))
            .await
            .1["instance"]["Purpose"],
        json!("rstudio")
    );

    // Each purpose keeps its own minimum and maximum.
    eventually("each purpose has one free instance", WAIT, || async {
        (server.free("rstudio").await == 1 && server.free("jupyter").await == 1).then_some(())
    })
    .await;
    server.request("bo").await;
    let (status, _) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "bo", "purpose": "jupyter"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "cy", "purpose": "jupyter"}),
        )
        .await;
    assert_eq!(status, 429, "jupyter's maximum is 2: {body}");

    // Culling follows each purpose's timeout: RStudio's 3 s, JupyterLab's 10 minutes.
    eventually("ana's unvisited RStudio is culled", WAIT, || async {
        (!is_running(&server, &rstudio).await).then_some(())
    })
    .await;
    assert!(
        is_running(&server, &jupyter).await,
        "JupyterLab was culled with RStudio's timeout"
    );
}

/// One Jupyter protocol message on the shell channel.
fn execute_request(code: &str) -> String {
    let id = format!("{:032x}", rand::random::<u128>());
    json!({
        "header": {"msg_id": id, "username": "test", "session": "rstudio-pool-test",
                    "msg_type": "execute_request", "version": "5.3", "date": "2026-01-01T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": false, "store_history": false,
                     "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    })
    .to_string()
}

#[tokio::test]
async fn jupyterlab_runs_code_through_the_proxy_and_its_polling_is_not_activity() {
    const TIMEOUT_MS: u64 = 6000;
    let server = Server::start(Options {
        min_free: 0,
        env: vec![path_with_venv()],
        extra_yaml: format!("purposes:\n  jupyter:\n    timeout_instance_ms: {TIMEOUT_MS}\n"),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "ana", "purpose": "jupyter", "wait": 60}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let client = server.client();

    // The lab page loads through the proxy, under the instance's prefix.
    let r = client
        .get(server.proxy_url(&format!("/{id}/lab")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("JupyterLab"));

    // A kernel started with the REST API...
    let r = client
        .post(server.proxy_url(&format!("/{id}/api/kernels")))
        .json(&json!({"name": "python3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let kernel: Value = r.json().await.unwrap();
    let kernel_id = kernel["id"].as_str().unwrap();

    // ...runs code sent over its WebSocket through the proxy.
    let url = format!(
        "ws://{}/{id}/api/kernels/{kernel_id}/channels",
        server.proxy
    );
    // One socket, no second try: WebSockets are tunnelled outside Pingora's HTTP session,
    // which tore some down right after their 101 (cloudflare/pingora#946).
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    socket
        .send(Message::text(execute_request("print(6 * 7)")))
        .await
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["header"]["msg_type"] == json!("stream") {
                return value["content"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
            }
        }
        String::new()
    })
    .await
    .expect("the kernel's output within 60 s");
    let _ = socket.close(None).await;
    assert_eq!(output, "42\n");

    // JupyterLab's background polling of its REST API does not keep the instance alive.
    let started = Instant::now();
    let polling = async {
        while is_running(&server, &id).await {
            for path in [
                "api/kernels",
                "api/sessions",
                "api/status",
                "lab/api/settings",
            ] {
                let _ = client
                    .get(server.proxy_url(&format!("/{id}/{path}")))
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                started.elapsed() < WAIT,
                "still alive after {WAIT:?} of polling only"
            );
        }
    };
    polling.await;
    assert!(
        started.elapsed() >= Duration::from_millis(TIMEOUT_MS / 2),
        "culled too early: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_progress_page_gives_way_to_the_workspace() {
    let server = Server::start(Options {
        min_free: 0,
        extra_yaml: "purposes:\n  rstudio:\n    command: [\"sh\", \"-c\", \"sleep 2; exec {exe} demo-workspace --port {port} --instance-id {instance_id}\"]\n".into(),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["ready"],
        json!(false),
        "REQUEST_RSTUDIO answers at once: {body}"
    );
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let r = server
        .client()
        .get(server.proxy_url(&format!("/{id}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Starting the workspace") && page.contains("http-equiv=\"refresh\""),
        "{page}"
    );
    // Which workspace, and for how long; no usual time before any start finished.
    assert!(
        page.contains("<b class=\"purpose\">rstudio</b>")
            && page.contains(&format!("<code class=\"instance\">{id}</code>"))
            && page.contains("has been starting for <span class=\"elapsed\">"),
        "{page}"
    );
    assert!(!page.contains("usually takes"), "{page}");
    wait_ready(&server, &id).await;
    let (_, page) = server.page(&format!("/{id}/")).await;
    assert!(page.contains(&id), "{page}");
    let (_, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(body["ready"], json!(true), "{body}");
    // The next start is measured against the first (its command sleeps 2 s).
    let next = server.request("ben").await;
    let (status, page) = server.page(&format!("/{next}/")).await;
    assert_eq!(status, 503, "the progress page: {page}");
    let usual: u64 = page
        .split("It usually takes about ")
        .nth(1)
        .and_then(|rest| rest.split(" s.").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no usual time in {page}"));
    assert!((2..30).contains(&usual), "{page}");
}

#[tokio::test]
async fn a_start_that_fails_is_shown_with_a_retry() {
    let server = Server::start(Options {
        min_free: 0,
        extra_yaml: "purposes:\n  rstudio:\n    command: [\"sh\", \"-c\", \"echo cannot start >&2; exit 3\"]\n".into(),
        ..Options::default()
    })
    .await;
    let id = server.request("ana").await;
    let page = eventually(
        "the failure is shown on the workspace's page",
        WAIT,
        || async {
            let r = server
                .client()
                .get(server.proxy_url(&format!("/{id}/")))
                .send()
                .await
                .ok()?;
            let page = r.text().await.ok()?;
            page.contains("could not start").then_some(page)
        },
    )
    .await;
    assert!(page.contains("stopped while it was starting"), "{page}");
    // What to act on: how it ended, the end of its log, the id to quote.
    assert!(page.contains("exited with status 3"), "{page}");
    assert!(
        page.contains("<pre class=\"log\">cannot start</pre>"),
        "{page}"
    );
    assert!(
        page.contains(&format!("<code class=\"instance\">{id}</code>")),
        "{page}"
    );
    assert!(
        page.contains(&format!("action=\"/{id}/.rstudio-pool/retry\"")),
        "{page}"
    );
    assert!(
        !is_known(&server, &id).await,
        "the failed instance is out of the pool"
    );

    // Retry: a new instance for the same user, and the browser is sent there.
    let r = server
        .client()
        .post(server.proxy_url(&format!("/{id}/.rstudio-pool/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(!location.contains(&id), "{location}");
    let (_, status) = server.command("GET_STATUS", json!({})).await;
    let new_id = status["instances"][0].as_str().unwrap().to_owned();
    assert!(location.contains(&new_id), "{location} is not {new_id}");
}

/// A notebook with one cell, as JupyterLab saves it through its contents API.
fn notebook(source: &str) -> Value {
    json!({
        "type": "notebook",
        "format": "json",
        "content": {
            "nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": null,
                       "outputs": [], "source": source}]
        }
    })
}

/// Real JupyterLab in token mode (issue 14): a user who only saves every few seconds keeps
/// their workspace; once idle it is paused (JupyterLab's processes end, the folder stays);
/// asking again resumes the same instance, and the notebook reads back byte for byte.
#[tokio::test]
async fn jupyterlab_saves_count_and_a_paused_lab_comes_back_with_the_notebook() {
    const TIMEOUT_MS: u64 = 6000;
    let server = Server::start(Options {
        min_free: 0,
        env: vec![path_with_venv()],
        auth_yaml: Some(
            "auth:\n  mode: token\n  secrets: [\"test-secret-0123456789abcdef\"]\n".into(),
        ),
        extra_yaml: format!("purposes:\n  jupyter:\n    timeout_instance_ms: {TIMEOUT_MS}\n"),
        ..Options::default()
    })
    .await;
    let ask = || async {
        server
            .command(
                "REQUEST_RSTUDIO",
                json!({"userId": "ana", "purpose": "jupyter", "wait": 90}),
            )
            .await
    };
    let (status, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    let id = body["instanceId"].as_str().unwrap().to_owned();
    // The link is exchanged for the session cookie, as a browser does.
    let r = server
        .client()
        .get(body["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap());
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let contents = server.proxy_url(&format!("/{id}/api/contents/analysis.ipynb"));
    let save = |n: usize| {
        server
            .client()
            .put(&contents)
            .header("cookie", &cookie)
            .json(&notebook(&format!("x = {n}\nprint(x * 6)")))
            .send()
    };

    // Saving every 2 s for more than two timeouts: the saves are the user's actions.
    let until = Instant::now() + Duration::from_millis(TIMEOUT_MS * 2 + 2000);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let r = save(n).await.unwrap();
        assert!(r.status().is_success(), "save {n}: {}", r.status());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        is_running(&server, &id).await,
        "a user saving every 2 s was culled"
    );
    let file = server
        .state_dir()
        .join("work")
        .join(&id)
        .join("analysis.ipynb");
    let saved = std::fs::read(&file).unwrap();

    // Then the user leaves: paused, JupyterLab gone, the notebook kept.
    eventually("the idle lab is paused", WAIT, || async {
        (common::state_of(&server, &id).await.as_deref() == Some("paused")).then_some(())
    })
    .await;
    eventually("JupyterLab's processes end", WAIT, || async {
        (!server.workspaces().iter().any(|(_, w)| *w == id)).then_some(())
    })
    .await;
    assert_eq!(std::fs::read(&file).unwrap(), saved);

    // Back: the same instance, resuming, then the notebook as it was saved.
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "ana", "purpose": "jupyter"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instanceId"], json!(id));
    assert_eq!(body["status"], json!("resuming"));
    let (status, body) = ask().await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("ready")),
        "{body}"
    );
    let r = server
        .client()
        .get(format!("{contents}?type=file&format=text&content=1"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let read: Value = r.json().await.unwrap();
    assert_eq!(
        read["content"].as_str().unwrap().as_bytes(),
        &saved[..],
        "the notebook came back changed"
    );
}

/// JupyterLab's kernel socket (issue 14): a tab that only keeps its socket alive with pings is
/// idle and its lab is paused; one that runs code every few seconds keeps its lab.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jupyter_kernel_socket_that_only_pings_is_idle_one_that_runs_code_is_not() {
    const TIMEOUT_MS: u64 = 6000;
    let server = Server::start(Options {
        min_free: 0,
        max: 2,
        env: vec![path_with_venv()],
        extra_yaml: format!("purposes:\n  jupyter:\n    timeout_instance_ms: {TIMEOUT_MS}\n"),
        ..Options::default()
    })
    .await;
    let mut sockets = Vec::new();
    for user in ["pings-only", "runs-code"] {
        let (status, body) = server
            .command(
                "REQUEST_RSTUDIO",
                json!({"userId": user, "purpose": "jupyter", "wait": 90}),
            )
            .await;
        assert_eq!(
            (status, body["status"].clone()),
            (200, json!("ready")),
            "{body}"
        );
        let id = body["instanceId"].as_str().unwrap().to_owned();
        let r = server
            .client()
            .post(server.proxy_url(&format!("/{id}/api/kernels")))
            .json(&json!({"name": "python3"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let kernel: Value = r.json().await.unwrap();
        let url = format!(
            "ws://{}/{id}/api/kernels/{}/channels",
            server.proxy,
            kernel["id"].as_str().unwrap()
        );
        let (socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        sockets.push((id, socket));
    }
    let (pinger, mut pinging) = sockets.remove(0);
    let (runner, mut running) = sockets.remove(0);
    let until = Instant::now() + Duration::from_millis(TIMEOUT_MS * 2 + 3000);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        // Until its lab is paused and the socket closed.
        let _ = pinging
            .send(Message::Ping(b"still here".to_vec().into()))
            .await;
        running
            .send(Message::text(execute_request(&format!("print({n})"))))
            .await
            .unwrap();
        // Drain what the kernels say, without waiting on them.
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(50), running.next()).await
        {}
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        is_running(&server, &runner).await,
        "a lab whose user runs code every 2 s was paused"
    );
    assert_eq!(
        common::state_of(&server, &pinger).await.as_deref(),
        Some("paused"),
        "a lab kept only by socket pings was not paused"
    );
}
