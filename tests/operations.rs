//! What an operator runs the pool with: Prometheus metrics that follow real events, the admin
//! page's access rules, audit events (also as JSON), failures people can act on, and stopping
//! a local run (`Ctrl-C`, `rstudio-pool down`). The real binary, real workspaces, real HTTP.

mod common;

use std::time::Duration;

use common::{eventually, is_known, wait_ready, Options, Server};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A second purpose whose workspace writes a line (with a credential in it) and exits.
const BROKEN: &str = "  broken:\n    min_free_instances: 0\n    max_instances: 2\n    command: [\"sh\", \"-c\", \"echo starting with password=hunter2 >&2; echo cannot bind the port >&2; exit 3\"]\n";

async fn scrape(server: &Server, token: Option<&str>) -> (u16, String) {
    let mut request = server
        .client()
        .get(format!("http://{}/metrics", server.api));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// One sample of the scraped text: name, labels, value.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// Every sample of the scraped text.
fn samples(text: &str) -> Vec<Sample<'_>> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels
                .strip_suffix('}')?
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            Some((name, labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of the sample `name{labels}` (exactly these labels, in any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text).into_iter().find_map(|(n, l, v)| {
        (n == name && l.len() == labels.len() && labels.iter().all(|x| l.contains(x))).then_some(v)
    })
}

/// The sum of every sample of `name` whose labels include `labels`.
fn total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| *n == name && labels.iter().all(|x| l.contains(x)))
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_follow_real_events() {
    let server = Server::start(Options {
        min_free: 1,
        max: 3,
        timeout_instance_ms: 3000,
        extra_yaml: format!("purposes:\n  rstudio:\n    on_idle: terminate\n{BROKEN}"),
        ..Options::default()
    })
    .await;
    let (status, text) = scrape(&server, None).await;
    assert_eq!(status, 200, "{text}");
    for family in [
        "# TYPE rstudio_pool_instances gauge",
        "# TYPE rstudio_pool_assignments_total counter",
        "# TYPE rstudio_pool_assignment_duration_seconds histogram",
        "# TYPE rstudio_pool_instance_seconds_total counter",
        "# TYPE rstudio_pool_provider_calls_total counter",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let rstudio = [("purpose", "rstudio")];
    assert_eq!(
        sample(&text, "rstudio_pool_min_free_instances", &rstudio),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "rstudio_pool_max_instances", &rstudio),
        Some(3.0)
    );

    // Two users, and the first one again.
    eventually("a warm instance", WAIT, || async {
        (server.census("rstudio").await["freeReady"] == json!(1)).then_some(())
    })
    .await;
    let a = server.request("ana").await;
    let b = server.request("ben").await;
    assert_eq!(server.request("ana").await, a);
    // Waiting for readiness ends with one 200 through the proxy; then three more, and one
    // for nothing (our 404 page).
    wait_ready(&server, &a).await;
    for _ in 0..3 {
        assert_eq!(server.page(&format!("/{a}/")).await.0, 200);
    }
    assert_eq!(server.page("/i-0123456789abcdef0/").await.0, 404);
    // One deleted, one culled when idle, one failed start.
    let (status, _) = server.command("DELETE", json!({"instanceId": b})).await;
    assert_eq!(status, 200);
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "cai", "purpose": "broken"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("ana's instance is culled when idle", WAIT, || async {
        (!is_known(&server, &a).await).then_some(())
    })
    .await;
    let text = eventually("the failed start is counted", WAIT, || async {
        let (_, text) = scrape(&server, None).await;
        let failed = sample(
            &text,
            "rstudio_pool_launch_failures_total",
            &[("purpose", "broken"), ("cause", "exited")],
        );
        (failed == Some(1.0)).then_some(text)
    })
    .await;

    let count = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(-1.0);
    let outcome = |o: &str| {
        count(
            "rstudio_pool_assignments_total",
            &[("purpose", "rstudio"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("warm") + outcome("launched"), 2.0, "{text}");
    assert_eq!(outcome("existing"), 1.0, "{text}");
    assert_eq!(outcome("pool_full"), 0.0, "{text}");
    assert_eq!(
        count(
            "rstudio_pool_assignment_duration_seconds_count",
            &[("purpose", "rstudio")]
        ),
        3.0
    );
    let ended = |reason: &str| {
        count(
            "rstudio_pool_terminations_total",
            &[("purpose", "rstudio"), ("reason", reason)],
        )
    };
    assert_eq!(ended("deleted"), 1.0, "{text}");
    assert_eq!(ended("idle"), 1.0, "{text}");
    assert_eq!(ended("admin"), 0.0, "{text}");
    // A request is counted once its answer is written, so a scrape right after an answer may
    // not see it yet; this one comes seconds after the last.
    let proxied = |path: &str, class: &str| {
        let labels = [("path", path), ("class", class)];
        total(&text, "rstudio_pool_proxy_requests_total", &labels)
    };
    assert_eq!(
        proxied("edge", "2xx") + proxied("pingora", "2xx"),
        4.0,
        "{text}"
    );
    assert_eq!(proxied("page", "4xx"), 1.0, "{text}");
    assert_eq!(
        sample(&text, "rstudio_pool_users", &rstudio),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "rstudio_pool_instances",
            &[("purpose", "rstudio"), ("state", "assigned")]
        ),
        Some(0.0)
    );
    assert!(
        count(
            "rstudio_pool_launch_to_ready_seconds_count",
            &[("purpose", "rstudio")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        count(
            "rstudio_pool_provider_calls_total",
            &[("operation", "launch")]
        ) >= 3.0
    );
    assert!(
        total(&text, "rstudio_pool_instance_seconds_total", &rstudio) > 0.0,
        "{text}"
    );
    assert!(
        !text.contains("ana") && !text.contains(&a),
        "no user or instance ids in labels"
    );

    // The audit log: one line per event, with user, instance, purpose and cause.
    let log = server.log();
    for needle in [
        format!("event=assign user=ana instance={a} purpose=rstudio"),
        format!("event=delete user=ben instance={b} purpose=rstudio cause=deleted"),
        format!("event=cull user=ana instance={a} purpose=rstudio cause=idle"),
        "event=launch_failure user=cai".to_owned(),
    ] {
        assert!(log.contains(&needle), "no `{needle}` in:\n{log}");
    }
}

/// A `POST` to the admin page as its form or script sends it: the session cookie and the
/// CSRF token when given.
async fn admin_post(
    server: &Server,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let content_type = if path == "/admin/login" {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    let mut request = server
        .client()
        .post(format!("http://{}{path}", server.api))
        .header("content-type", content_type)
        .body(body.to_owned());
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    if let Some(csrf) = csrf {
        request = request.header("x-csrf-token", csrf);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn metrics_and_the_admin_page_need_the_token_and_actions_a_csrf_token() {
    let token = "0p3r4t0r-t0ken";
    let server = Server::start(Options {
        api_token: Some(token.into()),
        ..Options::default()
    })
    .await;
    let (status, _) = scrape(&server, None).await;
    assert_eq!(status, 401);
    let (status, _) = scrape(&server, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, text) = scrape(&server, Some(token)).await;
    assert_eq!(status, 200);
    assert!(text.contains("rstudio_pool_instances"), "{text}");

    let admin = |path: &str| format!("http://{}{path}", server.api);
    let client = server.client();
    // Without a session: the login form, and nothing else.
    let page = client.get(admin("/admin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("action=\"/admin/login\"") && !page.contains("csrf-token"),
        "{page}"
    );
    let r = client.get(admin("/admin/state")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let id = server.request("ana").await;
    let target = json!({"instanceId": id}).to_string();
    let r = admin_post(&server, "/admin/terminate", None, None, &target).await;
    assert_eq!(r.status(), 401);
    // The bearer token is not a session for the page.
    let r = client
        .get(admin("/admin/state"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = admin_post(&server, "/admin/login", None, None, "token=nope").await;
    assert_eq!(r.status(), 401);

    // Signed in.
    let r = admin_post(
        &server,
        "/admin/login",
        None,
        None,
        &format!("token={token}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let page = client
        .get(admin("/admin"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{page}"))
        .to_owned();
    let state: Value = client
        .get(admin("/admin/state"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == json!(id))
        .unwrap_or_else(|| panic!("{id} not in {state}"));
    assert_eq!(listed["owner"], json!("ana"));
    assert_eq!(state["pools"]["rstudio"]["max"], json!(5));
    assert!(state["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == json!("assign") && e["instance"] == json!(id)));

    // An action without the CSRF token, or with another, is refused and changes nothing.
    let act = |action: &str, target: String, csrf: Option<String>| {
        let (server, cookie) = (&server, &cookie);
        let path = format!("/admin/{action}");
        async move {
            let r = admin_post(server, &path, Some(cookie), csrf.as_deref(), &target).await;
            r.status().as_u16()
        }
    };
    for presented in [None, Some("0000".to_owned())] {
        assert_eq!(act("terminate", target.clone(), presented).await, 403);
    }
    assert!(is_known(&server, &id).await);
    assert_eq!(
        act("terminate", target.clone(), Some(csrf.clone())).await,
        200
    );
    eventually("the instance is gone", WAIT, || async {
        (!is_known(&server, &id).await).then_some(())
    })
    .await;
    let (_, text) = scrape(&server, Some(token)).await;
    assert_eq!(
        sample(
            &text,
            "rstudio_pool_terminations_total",
            &[("purpose", "rstudio"), ("reason", "admin")]
        ),
        Some(1.0),
        "{text}"
    );
    // Pause and resume from the page; pausing what is not running is refused with a
    // reason (409), not a 500.
    let other = server.request("ben").await;
    wait_ready(&server, &other).await;
    let other_target = json!({"instanceId": other}).to_string();
    let act = |action: &'static str| act(action, other_target.clone(), Some(csrf.clone()));
    assert_eq!(act("pause").await, 200);
    assert_eq!(
        common::state_of(&server, &other).await.as_deref(),
        Some("paused")
    );
    assert_eq!(act("pause").await, 409);
    assert_eq!(act("resume").await, 200);
    wait_ready(&server, &other).await;
    let (_, text) = scrape(&server, Some(token)).await;
    for (name, labels) in [
        (
            "rstudio_pool_pauses_total",
            vec![("purpose", "rstudio"), ("reason", "admin")],
        ),
        ("rstudio_pool_resumes_total", vec![("purpose", "rstudio")]),
    ] {
        assert_eq!(sample(&text, name, &labels), Some(1.0), "{name}: {text}");
    }
    let r = admin_post(
        &server,
        "/admin/terminate",
        Some(&cookie),
        Some(&csrf),
        "not json",
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn a_failed_start_says_why_without_its_secrets() {
    let server = Server::start(Options {
        min_free: 0,
        extra_yaml: format!("purposes:\n  rstudio: {{}}\n{BROKEN}"),
        ..Options::default()
    })
    .await;
    // A caller that waits hears why, instead of `launching` for a replacement.
    let (status, body) = server
        .command(
            "REQUEST_RSTUDIO",
            json!({"userId": "cai", "purpose": "broken", "wait": 20}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("exited with status 3"), "{error}");
    assert!(error.contains("cannot bind the port"), "{error}");
    assert!(
        error.contains("password=[redacted]") && !error.contains("hunter2"),
        "{error}"
    );
    let log = server.log();
    assert!(
        log.contains("failed to start") && log.contains("exited with status 3"),
        "{log}"
    );
    assert!(!log.contains("hunter2"), "{log}");
}

#[tokio::test]
async fn audit_events_are_json_objects_under_log_format_json() {
    let server = Server::start(Options {
        env: vec![("LOG_FORMAT".into(), "json".into())],
        ..Options::default()
    })
    .await;
    let id = server.request("ana").await;
    let event = eventually("the assignment's audit line", WAIT, || async {
        server.log().lines().find_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["target"] == json!("audit") && v["event"] == json!("assign")).then_some(v)
        })
    })
    .await;
    assert_eq!(event["user"], json!("ana"));
    assert_eq!(event["instance"], json!(id));
    assert_eq!(event["purpose"], json!("rstudio"));
    assert!(event["time"].as_str().unwrap().ends_with('Z'), "{event}");
    // Every other line the logger wrote is a JSON object too.
    let log = server.log();
    let logged: Vec<&str> = log.lines().filter(|l| l.starts_with('{')).collect();
    assert!(logged.len() > 3);
    for line in logged {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
    }
}

#[tokio::test]
async fn ctrl_c_says_what_keeps_running_and_down_stops_it() {
    let mut server = Server::start(Options {
        min_free: 2,
        ..Options::default()
    })
    .await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    eventually("three workspaces run", WAIT, || async {
        (server.workspaces().len() == 3).then_some(())
    })
    .await;
    // While the pool runs, `down` refuses: the pool would launch its warm instances again.
    let (status, out) = server.run_cli(&["down"]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("stop the running rstudio-pool first"), "{out}");
    assert_eq!(server.workspaces().len(), 3);

    server.interrupt();
    let log = server.log();
    assert!(
        log.contains("3 workspace(s) keep running") && log.contains(" down"),
        "{log}"
    );
    assert_eq!(server.workspaces().len(), 3, "Ctrl-C leaves them running");

    let (status, out) = server.run_cli(&["down"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("terminated {id} (rstudio, ana)")),
        "{out}"
    );
    assert!(server.workspaces().is_empty(), "{:?}", server.workspaces());
    let records = std::fs::read_dir(server.state_dir().join("instances"))
        .unwrap()
        .count();
    assert_eq!(records, 0);
    let (status, out) = server.run_cli(&["down"]);
    assert!(status.success() && out.contains("no workspaces"), "{out}");
}

/// An open WebSocket is counted while it is open, on the edge's tunnel and on Pingora's path.
#[tokio::test]
async fn open_websockets_are_counted_while_open() {
    use futures_util::{SinkExt, StreamExt};
    for own_forwarding in [true, false] {
        let server = Server::start(Options {
            extra_yaml: format!("  own_forwarding: {own_forwarding}\n"),
            ..Options::default()
        })
        .await;
        let id = server.request("ana").await;
        wait_ready(&server, &id).await;
        let open = || async {
            let (_, text) = scrape(&server, None).await;
            sample(&text, "rstudio_pool_open_websockets", &[])
        };
        assert_eq!(open().await, Some(0.0));
        let url = format!("ws://{}/{id}/ws", server.proxy);
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        socket
            .send(tokio_tungstenite::tungstenite::Message::text("hi"))
            .await
            .unwrap();
        let echo = socket.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), "hi");
        assert_eq!(open().await, Some(1.0), "own_forwarding {own_forwarding}");
        socket.close(None).await.unwrap();
        drop(socket);
        eventually("the closed socket is no longer counted", WAIT, || async {
            (open().await == Some(0.0)).then_some(())
        })
        .await;
        let (_, text) = scrape(&server, None).await;
        let path = if own_forwarding { "tunnel" } else { "pingora" };
        assert_eq!(
            sample(
                &text,
                "rstudio_pool_proxy_requests_total",
                &[("path", path), ("class", "1xx")]
            ),
            Some(1.0),
            "{text}"
        );
    }
}

/// Links and refusals are counted as they happen: a link exchanged, the same link again
/// from a browser without the session, a forged link, and a request with no session at all.
#[tokio::test]
async fn link_exchanges_and_refusals_are_counted() {
    let server = Server::start(Options {
        auth_yaml: Some(
            "auth:\n  mode: token\n  secrets: [\"operations-secret-0123456789\"]\n".into(),
        ),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let link = body["url"].as_str().unwrap().to_owned();
    wait_until_ready_via_status(&server, &id).await;
    let client = server.client().clone();
    let get = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(link.clone()).await, 302, "the link is exchanged");
    assert_eq!(get(link.clone()).await, 401, "spent, and no session");
    let forged = format!("{}?rsp_token=forged", server.proxy_url(&format!("/{id}/")));
    assert_eq!(get(forged).await, 401);
    assert_eq!(get(server.proxy_url(&format!("/{id}/"))).await, 401);
    let text = eventually("the four requests are counted", WAIT, || async {
        let (_, text) = scrape(&server, None).await;
        let refused = sample(
            &text,
            "rstudio_pool_auth_refusals_total",
            &[("reason", "no_session")],
        );
        (refused == Some(3.0)).then_some(text)
    })
    .await;
    for (outcome, n) in [("ok", 1.0), ("spent", 1.0), ("invalid", 1.0)] {
        assert_eq!(
            sample(
                &text,
                "rstudio_pool_link_exchanges_total",
                &[("outcome", outcome)]
            ),
            Some(n),
            "{outcome}: {text}"
        );
    }
    assert!(server.log().contains(&format!(
        "event=link_exchange user=ana instance={id} purpose=rstudio"
    )));
}

/// Ready, as `GET_STATUS` says, without a request through the proxy (which would need a
/// session here).
async fn wait_until_ready_via_status(server: &Server, id: &str) {
    eventually("the instance is ready", WAIT, || async {
        (common::state_of(server, id).await.as_deref() == Some("ready")).then_some(())
    })
    .await;
}
