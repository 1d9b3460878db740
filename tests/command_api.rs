//! The command API of the original service, over HTTP against the real server and real
//! workspace processes (issue 2).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{answers, eventually, Options, Raw, Server};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn each_command_has_its_happy_path() {
    let server = Server::start(Options {
        min_free: 1,
        max: 4,
        ..Options::default()
    })
    .await;

    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "1234-abcd"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["instanceId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("i-") && id.len() == 19, "{id}");
    assert_eq!(body["url"], json!(server.proxy_url(&format!("/{id}/"))));
    assert!(body["ready"].is_boolean(), "{body}");
    assert_eq!(
        body["status"],
        json!(if body["ready"] == json!(true) {
            "ready"
        } else {
            "launching"
        })
    );

    // The same user gets the same instance.
    assert_eq!(server.request("1234-abcd").await, id);

    let (status, body) = server.command("GET_STATUS", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["instances"], json!([id]));

    let (status, body) = server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await;
    assert_eq!(status, 200, "{body}");
    let instance = &body["instance"];
    assert_eq!(instance["instanceId"], json!(id));
    assert_eq!(instance["userId"], json!("1234-abcd"));
    assert_eq!(instance["Purpose"], json!("rstudio"));
    assert!(instance.get("keyName").is_some(), "{instance}");
    let upstream = server.upstream(&id).await;
    eventually("the workspace answers on its port", WAIT, || async {
        answers(&upstream).await.then_some(())
    })
    .await;

    let (status, body) = server.command("DELETE", json!({"instanceId": id})).await;
    assert_eq!((status, body), (200, json!({"status": "OK"})));

    // The process is stopped: nothing answers on its port any more, and it is gone.
    assert!(
        !answers(&upstream).await,
        "{upstream} still answers after DELETE"
    );
    assert!(server.workspaces().iter().all(|(_, w)| *w != id));
    let (status, _) = server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await;
    assert_eq!(status, 404);
    let (_, body) = server.command("GET_STATUS", json!({})).await;
    assert_eq!(body["instances"], json!([]));

    // The pool tops up again, and the user gets a new instance, never the deleted one.
    eventually("the pool tops up to one free instance", WAIT, || async {
        (server.free("rstudio").await == 1).then_some(())
    })
    .await;
    let again = server.request("1234-abcd").await;
    assert_ne!(again, id);
}

#[tokio::test]
async fn every_error_has_its_status_and_a_message() {
    let server = Server::start(Options {
        min_free: 0,
        max: 1,
        ..Options::default()
    })
    .await;
    let unknown = "i-0123456789abcdef0";
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "not valid JSON"),
        ("".into(), 400, "not valid JSON"),
        (
            r#"{"command":"REBOOT","payload":{}}"#.into(),
            400,
            "unknown command",
        ),
        (r#"{"payload":{}}"#.into(), 400, "`command` is missing"),
        (
            r#"{"command":"REQUEST_RSTUDIO","payload":{}}"#.into(),
            400,
            "userId",
        ),
        (
            r#"{"command":"REQUEST_RSTUDIO","payload":{"userId":["x"]}}"#.into(),
            400,
            "must be a string",
        ),
        (
            r#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"a","purpose":"cobol"}}"#.into(),
            400,
            "unknown purpose",
        ),
        (
            r#"{"command":"DELETE","payload":{}}"#.into(),
            400,
            "instanceId",
        ),
        (
            r#"{"command":"DELETE","payload":{"instanceId":"nope"}}"#.into(),
            400,
            "not an instance id",
        ),
        (
            format!(r#"{{"command":"DELETE","payload":{{"instanceId":"{unknown}"}}}}"#),
            404,
            "not in the pool",
        ),
        (
            format!(r#"{{"command":"GET_STATUS","payload":{{"instanceId":"{unknown}"}}}}"#),
            404,
            "not in the pool",
        ),
        (
            format!(
                "{{\"command\":\"GET_STATUS\",\"payload\":{{\"pad\":\"{}\"}}}}",
                "x".repeat(100_000)
            ),
            413,
            "larger than",
        ),
    ];
    for (body, expected_status, expected_text) in cases {
        let (status, answer) = server.post_raw(body.clone()).await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(status, expected_status, "{shown}: {answer}");
        let message = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{shown}: no error field in {answer}"));
        assert!(
            message.contains(expected_text),
            "{shown}: `{message}` lacks `{expected_text}`"
        );
    }

    // Pool full: the one instance goes to the first user, the second is told why.
    server.request("first").await;
    let (status, answer) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "second"}))
        .await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("maximum of 1"),
        "{answer}"
    );

    // Wrong method and path.
    let r = server
        .client()
        .get(format!("http://{}/", server.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = server
        .client()
        .post(format!("http://{}/nope", server.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // Nothing above took the server down.
    assert_eq!(server.command("GET_STATUS", json!({})).await.0, 200);
}

/// The API answers plain requests itself and leaves the rest to Pingora's HTTP server: one
/// kept-alive connection carries both kinds, and both answer alike.
#[tokio::test]
async fn one_connection_carries_commands_in_every_framing() {
    let server = Server::start(Options {
        min_free: 0,
        max: 2,
        api_token: Some("api-secret".into()),
        ..Options::default()
    })
    .await;
    let post = |body: &str, headers: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer api-secret\r\n\
             Content-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
    };
    let chunked = |body: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer api-secret\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    let json_of = |body: &[u8]| -> Value { serde_json::from_slice(body).unwrap() };
    let header = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut c = Raw::connect(server.api).await;

    // A command, then the same command chunked (Pingora's path): the same answer.
    let assign = r#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"framed"}}"#;
    c.send(post(assign, "")).await;
    let (status, plain_headers, body) = c.response(false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let first = json_of(&body);
    let id = first["instanceId"].as_str().unwrap().to_owned();
    c.send(chunked(assign)).await;
    let (status, chunked_headers, body) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["instanceId"], first["instanceId"]);
    for name in ["content-type", "cache-control"] {
        assert_eq!(
            header(&plain_headers, name),
            header(&chunked_headers, name),
            "{name}"
        );
    }
    assert_eq!(
        header(&plain_headers, "content-type").as_deref(),
        Some("application/json")
    );

    // Two requests written at once are answered in order.
    let status_of = format!(r#"{{"command":"GET_STATUS","payload":{{"instanceId":"{id}"}}}}"#);
    c.send(format!(
        "{}{}",
        post(r#"{"command":"GET_STATUS","payload":{}}"#, ""),
        post(&status_of, "")
    ))
    .await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["instances"], json!([id]));
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["instance"]["userId"], "framed");

    // A body that arrives after its head, in two pieces.
    let request = post(&status_of, "");
    let (head, rest) = request.split_at(request.len() - status_of.len() / 2);
    c.send(head).await;
    c.send(rest).await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["instance"]["instanceId"], json!(id));

    // Mistakes, on either path, get their status and keep the connection.
    c.send(post("{not json", "")).await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 400);
    assert!(json_of(&body)["error"].as_str().unwrap().contains("JSON"));
    c.send(chunked("{not json")).await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 400);
    assert!(json_of(&body)["error"].as_str().unwrap().contains("JSON"));
    c.send("POST / HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\n{}")
        .await;
    let (status, headers, _) = c.response(false).await;
    assert_eq!(status, 401);
    assert_eq!(
        header(&headers, "www-authenticate").as_deref(),
        Some("Bearer")
    );
    // A health check by `HEAD` is answered without a body, so the next answer is whole.
    c.send("HEAD /healthz HTTP/1.1\r\nHost: api\r\n\r\n").await;
    let (status, _, body) = c.response(true).await;
    assert_eq!((status, body.len()), (200, 0));
    c.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n").await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["status"], "ok");

    // `Connection: close` is answered, then the connection ends.
    c.send(post(&status_of, "Connection: close\r\n")).await;
    let (status, headers, _) = c.response(false).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "connection").as_deref(), Some("close"));
    assert!(
        c.closed().await,
        "the connection stayed open after `Connection: close`"
    );

    // A body over the limit is refused before it is read, and the connection ends.
    let mut c = Raw::connect(server.api).await;
    c.send(
        "POST / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer api-secret\r\n\
         Content-Length: 10000000\r\n\r\n{",
    )
    .await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 413);
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("larger than"));
    assert!(
        c.closed().await,
        "the connection stayed open after a refused body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_give_one_instance_per_user_within_the_maximum() {
    const USERS: usize = 50;
    const REQUESTS: usize = 200;
    const MAX: usize = 60;
    let server = Arc::new(
        Server::start(Options {
            min_free: 5,
            max: MAX,
            ..Options::default()
        })
        .await,
    );

    // Count the real workspace processes throughout the burst.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        // A weak reference, so that a failing assertion still drops the server and its
        // workspaces.
        let (server, done, most) = (
            Arc::downgrade(&server),
            Arc::clone(&done),
            Arc::clone(&most),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let Some(server) = server.upgrade() else {
                    return;
                };
                most.fetch_max(server.workspaces().len(), Ordering::SeqCst);
                drop(server);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let calls = (0..REQUESTS).map(|n| {
        let server = Arc::clone(&server);
        let user = format!("user-{}", n % USERS);
        tokio::spawn(async move {
            let (status, body) = server
                .command("REQUEST_RSTUDIO", json!({"userId": user}))
                .await;
            (user, status, body)
        })
    });
    let results = futures_util::future::join_all(calls).await;

    let mut by_user: HashMap<String, HashSet<String>> = HashMap::new();
    for result in results {
        let (user, status, body) = result.unwrap();
        assert_eq!(status, 200, "{user}: {body}");
        by_user
            .entry(user)
            .or_default()
            .insert(body["instanceId"].as_str().unwrap().to_owned());
    }
    assert_eq!(by_user.len(), USERS);
    let mut owners: HashMap<String, String> = HashMap::new();
    for (user, ids) in &by_user {
        assert_eq!(ids.len(), 1, "{user} got {ids:?}");
        let id = ids.iter().next().unwrap();
        if let Some(other) = owners.insert(id.clone(), user.clone()) {
            panic!("{id} went to {user} and {other}");
        }
    }

    // Free instances return to 5, and the real processes are exactly the pool's.
    eventually("five free instances again", WAIT, || async {
        (server.free("rstudio").await == 5).then_some(())
    })
    .await;
    eventually("55 workspace processes", WAIT, || async {
        let n = server.workspaces().len();
        if n != USERS + 5 {
            eprintln!(
                "{n} workspace processes; census {}",
                server.census("rstudio").await
            );
        }
        (n == USERS + 5).then_some(())
    })
    .await;
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= MAX,
        "{most} workspace processes ran at once, over the maximum of {MAX}"
    );

    // Each user's instance is theirs in GET_STATUS, and a repeat call returns it again.
    let (_, status) = server.command("GET_STATUS", json!({})).await;
    let listed: HashSet<String> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, owners.keys().cloned().collect());
    for (id, user) in owners.iter().take(10) {
        assert_eq!(&server.request(user).await, id);
    }
}

#[tokio::test]
async fn a_crash_loses_nothing() {
    let mut server = Server::start(Options {
        min_free: 2,
        max: 8,
        ..Options::default()
    })
    .await;
    let mut assigned = HashMap::new();
    for user in ["ana", "bo", "cy"] {
        assigned.insert(user, server.request(user).await);
    }
    eventually("two free instances", WAIT, || async {
        (server.census("rstudio").await["freeReady"] == json!(2)).then_some(())
    })
    .await;
    let before: Value = server.command("GET_STATUS", json!({})).await.1["instances"].clone();
    let processes_before: HashSet<String> =
        server.workspaces().into_iter().map(|(_, id)| id).collect();
    assert_eq!(processes_before.len(), 5);

    server.kill9();
    // The workspaces outlive the crash.
    assert_eq!(server.workspaces().len(), 5);
    server.restart().await;

    let after: Value = server.command("GET_STATUS", json!({})).await.1["instances"].clone();
    assert_eq!(after, before);
    for (user, id) in &assigned {
        assert_eq!(
            &server.request(user).await,
            id,
            "{user} got another instance after the restart"
        );
        let (_, body) = server
            .command("GET_STATUS", json!({"instanceId": id}))
            .await;
        assert_eq!(body["instance"]["userId"], json!(user));
    }
    // No process the pool does not know, and the free ones were re-adopted, not replaced.
    eventually("the pool settles at two free instances", WAIT, || async {
        (server.free("rstudio").await == 2).then_some(())
    })
    .await;
    let processes_after: HashSet<String> =
        server.workspaces().into_iter().map(|(_, id)| id).collect();
    assert_eq!(processes_after, processes_before);
    for id in &processes_after {
        let (status, body) = server
            .command("GET_STATUS", json!({"instanceId": id}))
            .await;
        assert_eq!(
            status, 200,
            "process of {id} is unknown to the pool: {body}"
        );
    }
}

#[tokio::test]
async fn an_orphan_process_without_a_record_is_terminated() {
    let mut server = Server::start(Options {
        min_free: 1,
        max: 3,
        ..Options::default()
    })
    .await;
    let id = server.request("dora").await;
    server.kill9();
    // Lose the record, as a crash between spawning and recording would.
    std::fs::remove_file(
        server
            .state_dir()
            .join("instances")
            .join(format!("{id}.json")),
    )
    .unwrap();
    server.restart().await;
    eventually("the unrecorded process is stopped", WAIT, || async {
        server
            .workspaces()
            .iter()
            .all(|(_, w)| *w != id)
            .then_some(())
    })
    .await;
    let (status, _) = server
        .command("GET_STATUS", json!({"instanceId": id}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_workspace_that_never_gets_ready_is_replaced() {
    let server = Server::start(Options {
        min_free: 1,
        max: 2,
        ready_timeout_seconds: 1,
        // `sleep` never binds its port, so another test's workspace may be given the same
        // port meanwhile; a probe path nothing serves keeps that one from passing for it.
        extra_yaml: "purposes:\n  rstudio:\n    command: [\"sleep\", \"600\"]\n    readiness_path: /served-by-no-workspace\n".into(),
        ..Options::default()
    })
    .await;
    let first = eventually("a first workspace process", WAIT, || async {
        server.workspaces().into_iter().next().map(|(_, id)| id)
    })
    .await;
    eventually(
        "the first workspace is replaced by another",
        WAIT,
        || async {
            let now = server.workspaces();
            (!now.iter().any(|(_, id)| *id == first) && !now.is_empty()).then_some(())
        },
    )
    .await;
    assert!(
        server.log().contains("was not ready within"),
        "{}",
        server.log()
    );
}
