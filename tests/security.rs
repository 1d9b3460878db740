//! Only the owner reaches an instance, the command API needs its token off loopback, and
//! hostile input gets a clear 4xx without reaching a workspace it was not meant for (issue 5).

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};

use common::{wait_ready, Options, Server};
use reqwest::StatusCode;
use rstudio_pool::core::token::{Claims, Kind, Signer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-0123456789abcdef";
const OLD_SECRET: &str = "old-secret-0123456789abcdef";

fn token_auth(link_ttl_seconds: u64) -> String {
    format!(
        "auth:\n  mode: token\n  secrets: [\"{SECRET}\", \"{OLD_SECRET}\"]\n  link_ttl_seconds: {link_ttl_seconds}\n"
    )
}

/// The `url` of REQUEST_RSTUDIO and the instance id.
async fn link(server: &Server, user: &str) -> (String, String) {
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": user}))
        .await;
    assert_eq!(status, 200, "{body}");
    (
        body["url"].as_str().unwrap().to_owned(),
        body["instanceId"].as_str().unwrap().to_owned(),
    )
}

/// Opens a link as a browser would: returns the redirect target and the session cookie.
async fn exchange(server: &Server, url: &str) -> (String, String) {
    let r = server.client().get(url).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FOUND,
        "{url}: {}",
        r.text().await.unwrap()
    );
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    (location, set_cookie)
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

async fn get(server: &Server, path: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = server.client().get(server.proxy_url(path));
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    let r = request.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// Waits until the workspace answers the owner (readiness through the proxy with a cookie).
async fn wait_ready_with(server: &Server, id: &str, cookie: &str) {
    common::eventually(
        "the workspace answers its owner",
        Duration::from_secs(30),
        || async {
            (get(server, &format!("/{id}/"), Some(cookie)).await.0 == StatusCode::OK).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn links_and_cookies_open_only_their_owners_workspace() {
    let server = Server::start(Options {
        min_free: 2,
        auth_yaml: Some(token_auth(2)),
        ..Options::default()
    })
    .await;
    let (link_a, a) = link(&server, "ana").await;
    let (_, b) = link(&server, "bo").await;
    assert!(link_a.contains("rsp_token="), "{link_a}");

    let (location, set_cookie) = exchange(&server, &link_a).await;
    assert_eq!(location, format!("/{a}/"));
    for attribute in [
        format!("Path=/{a}/"),
        "HttpOnly".into(),
        "SameSite=Lax".into(),
    ] {
        assert!(
            set_cookie.contains(&attribute),
            "{set_cookie} lacks {attribute}"
        );
    }
    let cookie_a = cookie_pair(&set_cookie);
    wait_ready_with(&server, &a, &cookie_a).await;
    let (status, page) = get(&server, &format!("/{a}/"), Some(&cookie_a)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&a));

    // A's cookie opens no other workspace; no cookie opens nothing.
    let (status, page) = get(&server, &format!("/{b}/"), Some(&cookie_a)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{page}");
    assert!(page.contains("from the application"), "{page}");
    assert_eq!(
        get(&server, &format!("/{a}/"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(
            &server,
            &format!("/{a}/"),
            Some("rstudio-pool-session=forged.token")
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );

    // A link works once.
    let r = server.client().get(&link_a).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A link signed with a secret the server does not know is refused; one signed with the
    // older of its secrets (key rotation) is accepted.
    let forge = |secret: &str, user: &str| {
        let token = Signer::new(vec![secret.as_bytes().to_vec()]).sign(&Claims {
            kind: Kind::Link,
            instance: a.clone(),
            user: user.into(),
            expires_ms: u64::MAX / 2,
            nonce: rand::random(),
        });
        server.proxy_url(&format!("/{a}/?rsp_token={token}"))
    };
    let r = server
        .client()
        .get(forge("an-unknown-secret-0123456789", "ana"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = server
        .client()
        .get(forge(OLD_SECRET, "bo"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a link for another user opened ana's workspace"
    );
    exchange(&server, &forge(OLD_SECRET, "ana")).await;

    // An expired link is refused: the link lives 2 s here.
    let (link_c, _) = link(&server, "cy").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = server.client().get(&link_c).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Neither the token nor the session cookie reaches the workspace.
    let (link_a2, _) = link(&server, "ana").await;
    let with_path = link_a2.replace(&format!("/{a}/?"), &format!("/{a}/headers?x=1&"));
    let (location, set_cookie) = exchange(&server, &with_path).await;
    assert_eq!(location, format!("/{a}/headers?x=1"));
    let session = cookie_pair(&set_cookie);
    let r = server
        .client()
        .get(server.proxy_url(&location))
        .header("cookie", format!("{session}; theme=dark"))
        .send()
        .await
        .unwrap();
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["uri"], json!("/headers?x=1"));
    assert_eq!(echoed["headers"]["cookie"], json!("theme=dark"));
    let seen = echoed.to_string();
    let session_token = session.split_once('=').unwrap().1;
    assert!(
        !seen.contains(session_token),
        "the workspace saw the session: {seen}"
    );
    assert!(
        !seen.contains("rsp_token"),
        "the workspace saw the link token: {seen}"
    );
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket through the proxy with extra handshake headers: the socket, or the
/// status the handshake was refused with.
async fn ws_open(server: &Server, path: &str, headers: &[(&str, &str)]) -> Result<Socket, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}{path}", server.proxy)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().append(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

async fn ask(socket: &mut Socket, text: &str) -> String {
    socket.send(Message::text(text)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("an answer within 10 s")
        .expect("the socket is open")
        .unwrap()
        .into_text()
        .unwrap()
        .as_str()
        .to_owned()
}

/// WebSockets (tunnelled outside Pingora's HTTP session) let in exactly whom plain requests
/// let in, and the workspace sees the same rewritten handshake a plain request would carry.
#[tokio::test]
async fn websockets_let_in_and_rewrite_as_plain_requests_do() {
    let server = Server::start(Options {
        min_free: 2,
        auth_yaml: Some(token_auth(60)),
        ..Options::default()
    })
    .await;
    let (link_a, a) = link(&server, "ana").await;
    let (_, b) = link(&server, "bo").await;
    let session = cookie_pair(&exchange(&server, &link_a).await.1);
    wait_ready_with(&server, &a, &session).await;
    let cookie = format!("{session}; theme=dark");
    let spoofed = [
        ("cookie", cookie.as_str()),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-host", "evil.test"),
        ("x-rstudio-root-path", "/elsewhere/"),
    ];
    let mut plain = server
        .client()
        .get(server.proxy_url(&format!("/{a}/headers")));
    for (name, value) in spoofed {
        plain = plain.header(name, value);
    }
    let plain: Value = plain.send().await.unwrap().json().await.unwrap();

    let mut socket = ws_open(&server, &format!("/{a}/ws"), &spoofed)
        .await
        .expect("the owner's socket opens");
    let seen: Value = serde_json::from_str(&ask(&mut socket, "?headers").await).unwrap();
    for header in [
        "host",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-proto",
        "x-rstudio-root-path",
    ] {
        assert_eq!(
            seen[header], plain["headers"][header],
            "{header}: the socket's handshake {seen}, a plain request {plain}"
        );
    }
    assert_eq!(seen["cookie"], json!("theme=dark"));
    assert_eq!(seen["x-forwarded-for"], json!("127.0.0.1"));
    assert_eq!(seen["x-rstudio-root-path"], json!(format!("/{a}")));
    assert_eq!(ask(&mut socket, "hello").await, "hello");

    // Strangers get the 401 a plain request gets: no cookie, a forged one, ana's cookie on
    // bo's workspace.
    assert_eq!(
        ws_open(&server, &format!("/{a}/ws"), &[]).await.err(),
        Some(401)
    );
    let forged = [("cookie", "rstudio-pool-session=forged.token")];
    assert_eq!(
        ws_open(&server, &format!("/{a}/ws"), &forged).await.err(),
        Some(401)
    );
    let hers = [("cookie", session.as_str())];
    assert_eq!(
        ws_open(&server, &format!("/{b}/ws"), &hers).await.err(),
        Some(401)
    );
    // Her socket is still hers.
    assert_eq!(ask(&mut socket, "still here").await, "still here");
}

#[tokio::test]
async fn host_routing_gives_each_workspace_its_own_origin() {
    let server = Server::start(Options {
        min_free: 2,
        auth_yaml: Some(token_auth(60)),
        extra_yaml: "  host_domain: ws.test\n".into(),
        ..Options::default()
    })
    .await;
    let (link_a, a) = link(&server, "ana").await;
    let (_, b) = link(&server, "bo").await;
    let host_a = format!("{a}.ws.test");
    assert!(
        link_a.starts_with(&format!(
            "http://{host_a}:{}/?rsp_token=",
            server.proxy.port()
        )),
        "{link_a}"
    );
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host_a, server.proxy)
        .resolve(&format!("{b}.ws.test"), server.proxy)
        .build()
        .unwrap();
    let r = client.get(&link_a).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "/");
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("Path=/;"), "{set_cookie}");
    let cookie = cookie_pair(&set_cookie);
    let base_a = format!("http://{host_a}:{}", server.proxy.port());
    let base_b = format!("http://{b}.ws.test:{}", server.proxy.port());
    common::eventually(
        "ana's workspace answers on its own host",
        Duration::from_secs(30),
        || async {
            let r = client
                .get(format!("{base_a}/"))
                .header("cookie", &cookie)
                .send()
                .await
                .ok()?;
            (r.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    let page = client
        .get(format!("{base_a}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(page.text().await.unwrap().contains(&a));
    // Served from its root: no prefix, no root-path header.
    let echoed: Value = client
        .get(format!("{base_a}/headers"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echoed["uri"], json!("/headers"));
    assert!(
        echoed["headers"].get("x-rstudio-root-path").is_none(),
        "{echoed}"
    );
    // A's cookie opens nothing on B's host.
    let r = client
        .get(format!("{base_b}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_trusted_header_names_the_user_only_from_trusted_networks() {
    let trusted = Server::start(Options {
        min_free: 2,
        auth_yaml: Some("auth:\n  mode: header\n  user_header: X-Auth-User\n  trusted_networks: [\"127.0.0.0/8\"]\n".into()),
        ..Options::default()
    })
    .await;
    let a = trusted.request("ana").await;
    let as_user = |user: Option<&'static str>| {
        let mut r = trusted.client().get(trusted.proxy_url(&format!("/{a}/")));
        if let Some(u) = user {
            r = r.header("x-auth-user", u);
        }
        r.send()
    };
    common::eventually(
        "ana's workspace answers her",
        Duration::from_secs(30),
        || async { (as_user(Some("ana")).await.ok()?.status() == StatusCode::OK).then_some(()) },
    )
    .await;
    assert_eq!(
        as_user(Some("bo")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        as_user(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // The same header from a network that is not trusted counts for nothing.
    let untrusted = Server::start(Options {
        min_free: 1,
        auth_yaml: Some("auth:\n  mode: header\n  user_header: X-Auth-User\n  trusted_networks: [\"192.0.2.0/24\"]\n".into()),
        ..Options::default()
    })
    .await;
    let a = untrusted.request("ana").await;
    let r = untrusted
        .client()
        .get(untrusted.proxy_url(&format!("/{a}/")))
        .header("x-auth-user", "ana")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_command_api_off_loopback_needs_its_bearer_token() {
    let server = Server::start(Options {
        api_host: "0.0.0.0".into(),
        api_token: Some("api-token-0123456789".into()),
        ..Options::default()
    })
    .await;
    let url = format!("http://{}/", server.api);
    let body = json!({"command": "GET_STATUS", "payload": {}}).to_string();
    let r = server
        .client()
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("Authorization: Bearer"));
    let r = server
        .client()
        .post(&url)
        .bearer_auth("wrong-token-0123456789")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // With it, it works (the harness sends it).
    assert_eq!(server.command("GET_STATUS", json!({})).await.0, 200);
    assert_eq!(server.request("ana").await.len(), 19);
}

/// One GET with the request target exactly as given; returns the status and the body.
async fn raw_get(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn hostile_paths_get_a_clear_answer_and_reach_no_other_workspace() {
    let server = Server::start(Options {
        min_free: 2,
        ..Options::default()
    })
    .await;
    let a = server.request("ana").await;
    let b = server.request("bo").await;
    wait_ready(&server, &a).await;
    wait_ready(&server, &b).await;
    let long = format!("/i-{}/echo/x", "0".repeat(2000));
    let upper = format!("/{}/echo/x", a.to_uppercase());
    let cases: Vec<(String, u16)> = vec![
        (format!("/{a}/../{b}/echo/x"), 400),
        (format!("/{a}/%2e%2e/{b}/echo/x"), 400),
        (format!("/{a}/%2E./{b}/echo/x"), 400),
        (format!("/{a}/./echo/x"), 400),
        (format!("//{b}/echo/x"), 404),
        (format!("/{a}%2f{b}/echo/x"), 404),
        (format!("/{a}%2F..%2F{b}/echo/x"), 404),
        (long, 404),
        (upper, 404),
        ("/x-0123456789abcdef0/echo/x".into(), 404),
        ("/i-0123456789abcdef0/echo/x".into(), 404),
        // Encoded slashes and dots inside a segment stay inside A's workspace.
        (format!("/{a}/echo/%2e%2e%2f{b}"), 200),
        (format!("/{a}//echo/x"), 404),
    ];
    for (path, expected) in cases {
        // Sent as written: an HTTP client library would normalise the dot segments away.
        let (status, text) = raw_get(server.proxy, &path).await;
        let shown: String = path.chars().take(80).collect();
        assert_eq!(status, expected, "{shown}: {text}");
        if let Ok(echoed) = serde_json::from_str::<Value>(&text) {
            assert_eq!(
                echoed["instanceId"],
                json!(a),
                "{shown} reached another workspace: {text}"
            );
        }
    }

    // A header with a bare CR is refused before anything is proxied.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.proxy).await.unwrap();
    stream
        .write_all(
            format!("GET /{a}/echo/x HTTP/1.1\r\nHost: x\r\nX-Evil: a\rInjected: b\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    // The command API refuses a CR/LF header too, and still answers afterwards.
    let mut stream = tokio::net::TcpStream::connect(server.api).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nX-Evil: a\rb\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(server.command("GET_STATUS", json!({})).await.0, 200);
}

/// The page of a paused workspace (issue 14): only its owner's session sees it and resumes
/// it, with a same-origin `POST`; another user's session, no session, and a form on another
/// site are refused, and the workspace stays paused.
#[tokio::test]
async fn only_the_owner_resumes_a_paused_workspace_and_only_from_its_page() {
    let server = Server::start(Options {
        min_free: 0,
        timeout_instance_ms: 2000,
        auth_yaml: Some(token_auth(60)),
        ..Options::default()
    })
    .await;
    let (link_a, id) = link(&server, "ana").await;
    let ana = cookie_pair(&exchange(&server, &link_a).await.1);
    let (link_b, _) = link(&server, "bo").await;
    let bo = cookie_pair(&exchange(&server, &link_b).await.1);
    wait_ready_with(&server, &id, &ana).await;
    common::eventually(
        "ana's workspace paused",
        Duration::from_secs(60),
        || async {
            (common::state_of(&server, &id).await.as_deref() == Some("paused")).then_some(())
        },
    )
    .await;

    let (status, page) = get(&server, &format!("/{id}/"), Some(&ana)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.contains("paused to save cost")
            && page.contains(&format!("action=\"/{id}/.rstudio-pool/resume\"")),
        "{page}"
    );
    let (status, page) = get(&server, &format!("/{id}/"), Some(&bo)).await;
    assert!(
        status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED,
        "{status}"
    );
    assert!(!page.contains("rstudio-pool/resume"), "{page}");

    let resume = server.proxy_url(&format!("/{id}/.rstudio-pool/resume"));
    let post = |cookie: Option<&str>, origin: Option<&str>, site: Option<&str>| {
        let mut r = server.client().post(&resume);
        if let Some(c) = cookie {
            r = r.header("cookie", c.to_owned());
        }
        if let Some(o) = origin {
            r = r.header("origin", o.to_owned());
        }
        if let Some(s) = site {
            r = r.header("sec-fetch-site", s.to_owned());
        }
        r.send()
    };
    // Nobody, another user, and another site's form: refused, and still paused.
    for (cookie, origin, site) in [
        (None, None, None),
        (Some(bo.as_str()), None, None),
        (
            Some(ana.as_str()),
            Some("https://evil.example"),
            Some("cross-site"),
        ),
        (Some(ana.as_str()), None, Some("same-site")),
    ] {
        let r = post(cookie, origin, site).await.unwrap();
        assert!(
            r.status().is_client_error(),
            "{cookie:?} {origin:?} {site:?}: {}",
            r.status()
        );
        assert_eq!(
            common::state_of(&server, &id).await.as_deref(),
            Some("paused")
        );
    }
    // The owner's own page: resumed, and sent back to the workspace.
    let origin = format!("http://{}", server.proxy);
    let r = post(Some(&ana), Some(&origin), Some("same-origin"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"].to_str().unwrap(), format!("/{id}/"));
    wait_ready_with(&server, &id, &ana).await;
}

#[tokio::test]
async fn a_spent_link_leads_its_signed_in_owner_on_and_stays_spent_across_a_restart() {
    let mut server = Server::start(Options {
        auth_yaml: Some(token_auth(60)),
        ..Options::default()
    })
    .await;
    let (link_a, a) = link(&server, "ana").await;
    let (location, set_cookie) = exchange(&server, &link_a).await;
    let session = cookie_pair(&set_cookie);
    wait_ready_with(&server, &a, &session).await;

    // The owner clicks the link again in the application: signed in already, so on to the
    // address without the link (no new session), not "Link not valid".
    let again = server
        .client()
        .get(&link_a)
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::FOUND);
    assert_eq!(again.headers()["location"].to_str().unwrap(), location);
    assert!(again.headers().get("set-cookie").is_none());
    // Without the session it is spent.
    let r = server.client().get(&link_a).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A link handed out but not yet opened, and the spent one, across a restart.
    let (link_b, _) = link(&server, "bo").await;
    server.restart().await;
    let r = server.client().get(&link_a).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a spent link worked again after a restart"
    );
    exchange(&server, &link_b).await;
}
