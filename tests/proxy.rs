//! The edge proxy against the real server, real demo workspaces and real HTTP and WebSocket
//! clients (issue 3).

mod common;

use std::time::{Duration, Instant};

use common::{eventually, is_running, wait_ready, DemoProcess, Options, Raw, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A purpose section that runs the demo workspace with a short long poll.
fn demo_purpose(long_poll_ms: u64) -> String {
    format!(
        "purposes:\n  rstudio:\n    command: [\"{{exe}}\", \"demo-workspace\", \"--port\", \"{{port}}\", \"--instance-id\", \"{{instance_id}}\", \"--long-poll-ms\", \"{long_poll_ms}\"]\n"
    )
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket through the proxy and checks it with one echo. No second try: sockets
/// are tunnelled outside Pingora's HTTP session, which tore some down right after their 101
/// (cloudflare/pingora#946); a socket that does not echo fails the test.
async fn ws_connect(server: &Server, id: &str) -> Socket {
    let url = format!("ws://{}/{id}/ws", server.proxy);
    let (mut socket, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    echo(&mut socket, "open").await;
    socket
}

async fn echo(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("an echo within 10 s")
        .expect("the socket is open")
        .unwrap_or_else(|e| panic!("echo of {text:?}: {e}"));
    assert_eq!(reply.into_text().unwrap().as_str(), text);
}

#[tokio::test]
async fn http_passes_through_with_rstudio_rewriting() {
    let server = Server::start(Options::default()).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    let client = server.client();
    let get = |path: String| client.get(server.proxy_url(&path)).send();

    // The page of the right instance, and its cookie scoped to the instance.
    let r = get(format!("/{id}/")).await.unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains(&format!("Path=/{id}")), "{cookie}");
    assert!(r.text().await.unwrap().contains(&id));

    // Without the trailing slash: a redirect to it, query kept.
    let r = get(format!("/{id}?a=1")).await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], format!("/{id}/?a=1").as_str());

    // Redirects land under the prefix, whether the app honours the root path or not.
    for path in ["redirect", "redirect-root", "redirect-absolute"] {
        let r = get(format!("/{id}/{path}")).await.unwrap();
        assert_eq!(r.status(), 302, "{path}");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            location.ends_with(&format!("/{id}/landed")),
            "{path}: {location}"
        );
        assert!(
            !location.contains("127.0.0.1:"),
            "{path} leaks the upstream: {location}"
        );
        let landed = get(location.clone()).await.unwrap();
        assert_eq!(landed.text().await.unwrap(), "landed\n", "{location}");
    }

    // Query strings and encoded characters survive; forwarding headers are ours alone.
    let r = client
        .get(server.proxy_url(&format!("/{id}/echo/a%20b%2Fc?x=1&y=%2F%20&z")))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-rstudio-root-path", "/i-ffffffffffffffff0")
        .send()
        .await
        .unwrap();
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["uri"], json!("/echo/a%20b%2Fc?x=1&y=%2F%20&z"));
    let headers = &echoed["headers"];
    assert_eq!(headers["x-rstudio-root-path"], json!(format!("/{id}")));
    assert_eq!(headers["x-forwarded-for"], json!("127.0.0.1"));
    assert_eq!(headers["x-forwarded-proto"], json!("http"));
    assert_eq!(headers["x-forwarded-host"], json!(server.proxy.to_string()));
    assert_eq!(
        headers["x-forwarded-port"],
        json!(server.proxy.port().to_string())
    );
    assert_eq!(headers["host"], json!(server.upstream(&id).await));

    // A 50 MB upload is streamed through whole.
    const SIZE: usize = 50 * 1024 * 1024;
    let r = client
        .post(server.proxy_url(&format!("/{id}/upload")))
        .body(vec![7u8; SIZE])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], json!(SIZE));
}

#[tokio::test]
async fn the_proxy_answers_for_itself_without_leaking_addresses() {
    let server = Server::start(Options {
        min_free: 0,
        ..Options::default()
    })
    .await;
    let client = server.client();
    for (path, status, text) in [
        ("/", 404, "nothing here"),
        ("/favicon.ico", 404, "nothing here"),
        ("/i-0123456789abcdef0/", 404, "does not exist"),
    ] {
        let r = client.get(server.proxy_url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains(text), "{path}: {body}");
        assert!(!body.contains("127.0.0.1"), "{path}: {body}");
    }

    // A workspace that died answers 502 until the pool notices, then 404.
    let id = server.request("bo").await;
    wait_ready(&server, &id).await;
    for (pid, instance) in server.workspaces() {
        if instance == id {
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
    let r = client
        .get(server.proxy_url(&format!("/{id}/")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert!(status == 502 || status == 404, "{status}: {body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
    eventually("the dead workspace is forgotten", WAIT, || async {
        let r = client
            .get(server.proxy_url(&format!("/{id}/")))
            .send()
            .await
            .ok()?;
        (r.status() == 404).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_instance_is_404_at_once() {
    let server = Server::start(Options::default()).await;
    let id = server.request("dora").await;
    wait_ready(&server, &id).await;
    // The route is cached now; DELETE must invalidate it before it answers.
    let (status, _) = server.command("DELETE", json!({"instanceId": id})).await;
    assert_eq!(status, 200);
    let r = server
        .client()
        .get(server.proxy_url(&format!("/{id}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn other_paths_go_to_the_default_url() {
    let default = DemoProcess::start();
    let server = Server::start(Options {
        env: vec![(
            "DEFAULT_URL".into(),
            format!("http://localhost:{}", default.port),
        )],
        ..Options::default()
    })
    .await;
    let text = eventually("the default upstream answers", WAIT, || async {
        let r = server
            .client()
            .get(server.proxy_url("/landed"))
            .send()
            .await
            .ok()?;
        let text = r.text().await.ok()?;
        (text == "landed\n").then_some(text)
    })
    .await;
    assert_eq!(text, "landed\n");
    // The load balancer's health check is the proxy's own, not the default upstream's.
    let r = server
        .client()
        .get(server.proxy_url("/.rstudio-pool/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
}

#[tokio::test]
async fn websockets_echo_and_outlive_the_downstream_read_timeout() {
    let server = Server::start(Options {
        extra_yaml: "  downstream_read_timeout_ms: 1000\n".into(),
        ..Options::default()
    })
    .await;
    let id = server.request("eve").await;
    wait_ready(&server, &id).await;
    let mut socket = ws_connect(&server, &id).await;
    echo(&mut socket, "hello").await;
    // Silence longer than the downstream read timeout: the condition under test.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    echo(&mut socket, "still here").await;

    // A plain request that stalls mid-body is still cut by that timeout: it is not disabled.
    let mut stream = tokio::net::TcpStream::connect(server.proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("POST /{id}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stalled request was not cut within 10 s");
}

/// A WebSocket handshake the workspace answers with something other than 101 gets the
/// workspace's answer, with the proxy's rewriting, as any request would.
#[tokio::test]
async fn an_upgrade_the_workspace_declines_gets_its_answer() {
    let server = Server::start(Options::default()).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    let mut c = Raw::connect(server.proxy).await;
    c.send(format!(
        "GET /{id}/redirect?from=socket HTTP/1.1\r\nHost: edge.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ))
    .await;
    let (status, headers, _) = c.response(false).await;
    assert_eq!(status, 302, "{headers:?}");
    // The demo redirects to its root path's /landed: brought back under the instance.
    assert!(
        has(&headers, "location", &format!("/{id}/landed")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn idle_culling_tells_users_from_keepalives() {
    const TIMEOUT_MS: u64 = 3000;
    let server = Server::start(Options {
        min_free: 0,
        max: 6,
        timeout_instance_ms: TIMEOUT_MS,
        extra_yaml: demo_purpose(300),
        ..Options::default()
    })
    .await;
    let poller = server.request("only-long-polls").await;
    let typist = server.request("types").await;
    let silent = server.request("silent-socket").await;
    for id in [&poller, &typist, &silent] {
        wait_ready(&server, id).await;
    }
    let mut typing = ws_connect(&server, &typist).await;
    let _silent_socket = ws_connect(&server, &silent).await;

    // For three timeouts: the poller long-polls without pause, the typist sends a frame
    // every 700 ms. The silent socket stays open and quiet.
    let until = Instant::now() + Duration::from_millis(3 * TIMEOUT_MS);
    let poll_url = server.proxy_url(&format!("/{poller}/events/get_events"));
    let client = server.client().clone();
    let polling = tokio::spawn(async move {
        while Instant::now() < until {
            let _ = client.post(&poll_url).body("{}").send().await;
        }
    });
    while Instant::now() < until {
        echo(&mut typing, "keystroke").await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    polling.await.unwrap();

    assert!(
        !is_running(&server, &poller).await,
        "an instance kept busy only by long polls survived"
    );
    assert!(
        !is_running(&server, &silent).await,
        "a silent open socket kept its instance alive"
    );
    assert!(
        is_running(&server, &typist).await,
        "an instance in use was culled"
    );
    echo(&mut typing, "after").await;
    // And the typist is culled too once they stop.
    eventually(
        "the typist's instance is culled after they stop",
        WAIT,
        || async { (!is_running(&server, &typist).await).then_some(()) },
    )
    .await;
}

/// Idle means no user action (issue 14): a socket whose client only answers pings (as a
/// browser does for a tab left open) is culled, one that sends data frames is kept; a user
/// who only saves (`PUT` on a path whose `GET`s are keepalives) is kept, one whose tab only
/// polls that path is culled.
#[tokio::test]
async fn idle_means_no_user_action_pings_and_polls_are_not_saves_are() {
    const TIMEOUT_MS: u64 = 3000;
    let server = Server::start(Options {
        min_free: 0,
        max: 6,
        timeout_instance_ms: TIMEOUT_MS,
        extra_yaml: format!(
            "{}    keepalive_paths: [\"POST /events/get_events\", \"GET /api/*\"]\n",
            demo_purpose(300)
        ),
        ..Options::default()
    })
    .await;
    let pinger = server.request("answers-pings").await;
    let writer = server.request("sends-messages").await;
    let saver = server.request("saves").await;
    let poller = server.request("tab-polls-api").await;
    for id in [&pinger, &writer, &saver, &poller] {
        wait_ready(&server, id).await;
    }
    let mut pinging = ws_connect(&server, &pinger).await;
    let mut writing = ws_connect(&server, &writer).await;
    let until = Instant::now() + Duration::from_millis(3 * TIMEOUT_MS);
    let client = server.client().clone();
    let (save_url, poll_url) = (
        server.proxy_url(&format!("/{saver}/api/contents/notebook.ipynb")),
        server.proxy_url(&format!("/{poller}/api/contents/notebook.ipynb")),
    );
    while Instant::now() < until {
        // Control frames both ways on one socket (until its instance is culled and the
        // socket closed), a message on the other.
        let _ = pinging
            .send(Message::Ping(b"are you there".to_vec().into()))
            .await;
        let _ = pinging.send(Message::Pong(b"here".to_vec().into())).await;
        echo(&mut writing, "a cell run").await;
        let saved = client
            .put(&save_url)
            .body("{\"content\": 1}")
            .send()
            .await
            .unwrap();
        assert!(saved.status().as_u16() < 500, "{}", saved.status());
        let _ = client.get(&poll_url).send().await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(
        !is_running(&server, &pinger).await,
        "a socket that only exchanged pings kept its instance"
    );
    assert!(
        !is_running(&server, &poller).await,
        "a tab polling a keepalive path kept its instance"
    );
    assert!(
        is_running(&server, &writer).await,
        "a socket in use was culled"
    );
    assert!(
        is_running(&server, &saver).await,
        "a user who saves was culled"
    );
}

/// The idle clock starts when the workspace is ready, not at the request: a workspace that
/// takes longer to start than the timeout is not culled before its user could reach it.
#[tokio::test]
async fn the_idle_clock_starts_when_the_workspace_is_ready() {
    const TIMEOUT_MS: u64 = 3000;
    let server = Server::start(Options {
        min_free: 0,
        timeout_instance_ms: TIMEOUT_MS,
        // A workspace that takes 4 s to start, as JupyterLab can on a busy machine.
        extra_yaml: "purposes:\n  rstudio:\n    command: [\"sh\", \"-c\", \"sleep 4 && exec \\\"$0\\\" demo-workspace --port {port} --instance-id {instance_id}\", \"{exe}\"]\n".into(),
        ..Options::default()
    })
    .await;
    let id = server.request("slow-start").await;
    let ready_at = eventually("the workspace is ready", WAIT, || async {
        let (_, body) = server
            .command("GET_STATUS", json!({"instanceId": id}))
            .await;
        (body["instance"]["state"] == json!("ready")).then(Instant::now)
    })
    .await;
    let culled_at = eventually("the unvisited instance is culled", WAIT, || async {
        (!is_running(&server, &id).await).then(Instant::now)
    })
    .await;
    let after_ready = culled_at - ready_at;
    assert!(
        after_ready >= Duration::from_millis(TIMEOUT_MS - 500),
        "culled {after_ready:?} after it became ready, within the {TIMEOUT_MS} ms timeout"
    );
}

#[tokio::test]
async fn an_unvisited_instance_is_culled_on_time_across_a_restart() {
    const TIMEOUT_MS: u64 = 4000;
    let mut server = Server::start(Options {
        min_free: 0,
        timeout_instance_ms: TIMEOUT_MS,
        ..Options::default()
    })
    .await;
    let assigned_at = Instant::now();
    let id = server.request("never-comes").await;
    server.kill9();
    server.restart().await;
    assert!(
        is_running(&server, &id).await,
        "the restart lost the assignment"
    );
    eventually("the unvisited instance is culled", WAIT, || async {
        (!is_running(&server, &id).await).then_some(())
    })
    .await;
    let culled_after = assigned_at.elapsed();
    // Counted from the assignment, not from the restart: a restart must not extend it much.
    assert!(
        culled_after < Duration::from_millis(TIMEOUT_MS + 3000),
        "culled {culled_after:?} after assignment with a {TIMEOUT_MS} ms timeout"
    );
    assert!(
        culled_after >= Duration::from_millis(TIMEOUT_MS),
        "culled early: {culled_after:?}"
    );
}

fn has(headers: &[(String, String)], name: &str, value: &str) -> bool {
    headers.iter().any(|(n, v)| n == name && v == value)
}

#[tokio::test]
async fn one_connection_carries_every_kind_of_request() {
    let server = Server::start(Options {
        extra_yaml: demo_purpose(300),
        ..Options::default()
    })
    .await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    let mut c = Raw::connect(server.proxy).await;
    let get = |path: &str| format!("GET /{id}{path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let upload = |headers: &str, body: &[u8]| {
        let mut request =
            format!("POST /{id}/upload HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").into_bytes();
        request.extend_from_slice(body);
        request
    };

    // A plain request, its forwarding headers ours.
    c.send(get("/headers")).await;
    let (status, _, body) = c.response(false).await;
    assert_eq!(status, 200);
    let echoed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["instanceId"], json!(id));
    assert_eq!(echoed["uri"], json!("/headers"));
    assert_eq!(echoed["headers"]["x-forwarded-host"], json!("localhost"));
    assert_eq!(
        echoed["headers"]["x-rstudio-root-path"],
        json!(format!("/{id}"))
    );

    // HEAD: a length but no body; the next answer is still read from its start.
    c.send(format!(
        "HEAD /{id}/headers HTTP/1.1\r\nHost: localhost\r\n\r\n"
    ))
    .await;
    let (status, headers, _) = c.response(true).await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(n, _)| n == "content-length"));

    // Bodies: a small one, one too large to hold, one in chunks.
    c.send(upload("Content-Length: 1000\r\n", &[1; 1000])).await;
    assert_eq!(c.response(false).await.2, br#"{"bytes":1000}"#);
    c.send(upload("Content-Length: 300000\r\n", &[2; 300_000]))
        .await;
    assert_eq!(c.response(false).await.2, br#"{"bytes":300000}"#);
    let mut chunked = b"3e8\r\n".to_vec();
    chunked.extend_from_slice(&[3; 1000]);
    chunked.extend_from_slice(b"\r\n5\r\nhello\r\n0\r\n\r\n");
    c.send(upload("Transfer-Encoding: chunked\r\n", &chunked))
        .await;
    assert_eq!(c.response(false).await.2, br#"{"bytes":1005}"#);

    // A streamed answer, in many pieces.
    c.send(get("/stream?chunks=40&size=1000")).await;
    let (status, headers, body) = c.response(false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(has(&headers, "transfer-encoding", "chunked"), "{headers:?}");
    assert_eq!(body.len(), 40_000);
    for (i, piece) in body.chunks(1000).enumerate() {
        assert!(
            piece.iter().all(|&b| b == b'a' + (i % 26) as u8),
            "piece {i}"
        );
    }

    // Two requests in one write, answered in order; a redirect comes back under the prefix.
    c.send(format!("{}{}", get("/redirect"), get("/nowhere")))
        .await;
    let (status, headers, _) = c.response(false).await;
    assert_eq!(status, 302);
    assert!(
        has(&headers, "location", &format!("/{id}/landed")),
        "{headers:?}"
    );
    let (status, _, body) = c.response(false).await;
    assert_eq!((status, body.as_slice()), (404, &b"not found\n"[..]));

    // The long poll answers on the same connection.
    c.send(format!(
        "POST /{id}/events/get_events HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{{}}"
    ))
    .await;
    assert_eq!(c.response(false).await.2, br#"{"result":[]}"#);

    // The proxy's own answers too, after the workspace's.
    c.send(get("")).await;
    let (status, headers, _) = c.response(false).await;
    assert_eq!(status, 302);
    assert!(has(&headers, "location", &format!("/{id}/")), "{headers:?}");
    c.send(get("/landed")).await;
    assert_eq!(c.response(false).await.2, b"landed\n");
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_piece_by_piece() {
    let server = Server::start(Options::default()).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    // The second piece comes a minute after the first: the first must arrive without it.
    let mut c = Raw::connect(server.proxy).await;
    c.send(format!(
        "GET /{id}/stream?chunks=2&size=10&gap_ms=60000 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    ))
    .await;
    let status = c.line().await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    while !c.line().await.is_empty() {}
    assert_eq!(
        c.line().await.to_ascii_lowercase(),
        "a",
        "a piece of 10 bytes"
    );
    assert_eq!(c.bytes(12).await, b"aaaaaaaaaa\r\n");
}

/// The workspace's own count of its HTTP connections: (accepted, closed).
async fn connections(address: &str) -> (u64, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let counts: Value = client
        .get(format!("http://{address}/connections"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        counts["accepted"].as_u64().unwrap(),
        counts["closed"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_kept_workspace_connection_that_closes_is_replaced_unseen() {
    let server = Server::start(Options::default()).await;
    let id = server.request("ana").await;
    wait_ready(&server, &id).await;
    let address = server.upstream(&id).await;
    let mut c = Raw::connect(server.proxy).await;
    let landed = format!("GET /{id}/landed HTTP/1.1\r\nHost: localhost\r\n\r\n");
    c.send(&landed).await;
    assert_eq!(c.response(false).await.2, b"landed\n");

    // The workspace closes every idle connection, the proxy's kept one among them; only the
    // counting request's own stays open while it is answered.
    let r = reqwest::Client::new()
        .post(format!("http://{address}/close-idle"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(
        "the workspace has closed its idle connections",
        WAIT,
        || {
            let address = address.clone();
            async move {
                let (accepted, closed) = connections(&address).await;
                (accepted - closed == 1).then_some(())
            }
        },
    )
    .await;

    // The client's connection still works, over a new connection to the workspace (the
    // second count includes its own connection).
    let (before, _) = connections(&address).await;
    c.send(&landed).await;
    let (status, _, body) = c.response(false).await;
    assert_eq!((status, body.as_slice()), (200, &b"landed\n"[..]));
    let (after, _) = connections(&address).await;
    assert!(after >= before + 2, "accepted {before} then {after}");
}
