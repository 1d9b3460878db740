//! The edge's own HTTP/1.1 path is at least as strict as the Pingora path it bypasses
//! (issue 15). Two servers side by side, one with `proxy.own_forwarding` (the edge carries
//! admitted requests itself) and one without (Pingora carries everything), in front of a
//! recording workspace (`tests/workspaces/recorder.py`: it logs each request as it read it
//! and answers what the path asks for, hostile answers included). Raw sockets on the client
//! side; every answer is read strictly (CRLF only, one framing). For each finding, what the
//! client receives and what the workspace receives are the same on both paths, or the edge
//! refuses with a clear status.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{eventually, Options, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "test-secret-0123456789abcdef";
/// The head deadline of these servers: long enough for any head a test sends whole.
const HEAD_TIMEOUT_MS: u64 = 1500;

/// One server, its recording workspace and its owner's session.
struct Side {
    name: &'static str,
    server: Server,
    id: String,
    cookie: String,
}

fn recorder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workspaces/recorder.py")
}

async fn side(own_forwarding: bool, extra_proxy: &str) -> Side {
    let server = Server::start(Options {
        min_free: 1,
        max: 3,
        auth_yaml: Some(format!(
            "auth:\n  mode: token\n  secrets: [\"{SECRET}\"]\n  link_ttl_seconds: 60\n"
        )),
        extra_yaml: format!(
            "  own_forwarding: {own_forwarding}\n  request_head_timeout_ms: {HEAD_TIMEOUT_MS}\n{extra_proxy}\
             purposes:\n  rstudio:\n    command: [\"python3\", \"{}\", \"{{port}}\", \"{{instance_id}}\"]\n    readiness_path: /\n",
            recorder().display()
        ),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let url = body["url"].as_str().unwrap().to_owned();
    let id = body["instanceId"].as_str().unwrap().to_owned();
    let r = server.client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 302, "{url}");
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let side = Side {
        name: if own_forwarding { "edge" } else { "pingora" },
        server,
        id,
        cookie,
    };
    eventually("the workspace answers", Duration::from_secs(30), || async {
        let mut c = side.connect().await;
        c.send(&side.get("/ready", "")).await;
        c.answer().await.filter(|a| a.status == 200).map(|_| ())
    })
    .await;
    side
}

impl Side {
    async fn connect(&self) -> Client {
        Client::connect(self.server.proxy).await
    }

    /// A GET of `path` under the instance with the owner's cookie and more header lines.
    fn get(&self, path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET /{}{path} HTTP/1.1\r\nHost: edge\r\nCookie: {}\r\n{extra}\r\n",
            self.id, self.cookie
        )
        .into_bytes()
    }

    /// What the workspace recorded, in order.
    fn records(&self) -> Vec<Value> {
        let path = self
            .server
            .state_dir()
            .join("work")
            .join(&self.id)
            .join("record.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The requests recorded for `target` (as the workspace saw it).
    fn seen(&self, target: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["target"] == target)
            .collect()
    }

    /// One request on a new connection, and its answer (`None`: closed without one).
    async fn ask(&self, request: &[u8]) -> Option<Answer> {
        let mut c = self.connect().await;
        c.send(request).await;
        c.answer().await
    }
}

/// An answer read strictly: every head line ends in CRLF, at most one of `Content-Length`
/// and `Transfer-Encoding`, chunks exactly as RFC 9112 writes them.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl Client {
    async fn connect(address: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(address).await.unwrap(),
            buf: Vec::new(),
            closed: false,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more within `wait`: `false` when nothing came (closed, reset or quiet).
    async fn more(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => {
                self.closed = true;
                false
            }
            Err(_) => false,
        }
    }

    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.more(Duration::from_secs(10)).await {
                return false;
            }
        }
        true
    }

    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                assert!(
                    line.len() >= 2 && line[line.len() - 2] == b'\r',
                    "a line not ended by CRLF reached the client: {:?}",
                    String::from_utf8_lossy(&line)
                );
                assert!(
                    !line[..line.len() - 2].contains(&b'\r'),
                    "a bare CR reached the client"
                );
                return Some(line[..line.len() - 2].to_vec());
            }
            if !self.more(Duration::from_secs(10)).await {
                return None;
            }
        }
    }

    /// The next answer, read strictly; `None` when the connection ended without a whole one.
    async fn answer(&mut self) -> Option<Answer> {
        self.answer_to(false).await
    }

    async fn answer_to(&mut self, head_only: bool) -> Option<Answer> {
        let status_line = String::from_utf8(self.line().await?).unwrap();
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let (name, value) = line.split_once(':').expect("a header line");
            assert!(
                !name.ends_with([' ', '\t']) && !name.starts_with([' ', '\t']),
                "a header name with blanks reached the client: {line:?}"
            );
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let answer = |body| {
            Some(Answer {
                status,
                headers: headers.clone(),
                body,
            })
        };
        let has = |name: &str| headers.iter().any(|(n, _)| n == name);
        assert!(
            !(has("content-length") && has("transfer-encoding")),
            "Content-Length beside Transfer-Encoding reached the client: {headers:?}"
        );
        if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            return answer(Vec::new());
        }
        let mut body = Vec::new();
        if has("transfer-encoding") {
            loop {
                let size_line = String::from_utf8(self.line().await?).unwrap();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap(), 16)
                    .unwrap_or_else(|_| panic!("a chunk size line {size_line:?}"));
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                if !self.fill(size + 2).await {
                    return None;
                }
                body.extend(self.buf.drain(..size));
                assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
            }
        } else if let Some(length) = headers.iter().find(|(n, _)| n == "content-length") {
            let n: usize = length.1.parse().unwrap();
            if !self.fill(n).await {
                return None;
            }
            body = self.buf.drain(..n).collect();
        } else {
            while self.more(Duration::from_secs(10)).await {}
            body = std::mem::take(&mut self.buf);
        }
        answer(body)
    }

    /// Whether the server says nothing more for `wait` (or closes).
    async fn silent(&mut self, wait: Duration) -> bool {
        self.buf.is_empty() && !self.more(wait).await
    }
}

/// Both paths side by side.
async fn sides() -> (Side, Side) {
    tokio::join!(side(true, ""), side(false, ""))
}

#[tokio::test]
async fn workspace_answers_reach_the_client_in_one_reading_or_not_at_all() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let ask = |name: &str| side.get(&format!("/answer/{name}"), "");
        let who = side.name;

        // Bare LF heads and folded lines are written again canonically.
        let a = side.ask(&ask("bare-lf-head")).await.expect("an answer");
        assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]), "{who}");
        assert_eq!(a.header("x-a"), Some("1"), "{who}");
        let a = side.ask(&ask("folded")).await.expect("an answer");
        assert_eq!(a.status, 200, "{who}");
        assert_eq!(a.header("x-folded"), Some("a b"), "{who}");

        // Content-Length beside Transfer-Encoding: the length is not passed on.
        let a = side.ask(&ask("cl-and-te")).await.expect("an answer");
        assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]), "{who}");
        assert_eq!(a.header("content-length"), None, "{who}");

        // Two lengths: refused.
        let a = side.ask(&ask("conflicting-length")).await;
        assert_eq!(a.map(|a| a.status), Some(502), "{who}");

        // A bare LF in a trailer (a second answer hidden behind it) and junk after a chunk
        // size: never passed on as written, and no second answer follows.
        for name in ["bare-lf-trailer", "junk-chunk-size"] {
            let mut c = side.connect().await;
            c.send(&ask(name)).await;
            let a = c.answer().await;
            if who == "edge" {
                // Found before anything reached the client: a clear 502.
                assert_eq!(a.as_ref().map(|a| a.status), Some(502), "{who} {name}");
            }
            if let Some(a) = &a {
                assert!(
                    a.status == 502 || (a.status == 200 && a.body == b"hello"),
                    "{who} {name}: {a:?}"
                );
            }
            assert!(
                c.silent(Duration::from_millis(300)).await,
                "{who} {name}: more came after the answer: {:?}",
                String::from_utf8_lossy(&c.buf)
            );
        }
    }
}

#[tokio::test]
async fn workspace_cookies_stay_under_the_instance_however_they_are_spelled() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        let scope = format!("Path=/{}/", side.id);
        let cookies = |name: &'static str| {
            let request = side.get(&format!("/answer/{name}"), "");
            async move {
                let a = side.ask(&request).await.expect("an answer");
                assert_eq!(a.status, 200, "{who} {name}");
                a.all("set-cookie")
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            }
        };
        // `Path =/`: a browser reads it as `Path=/`.
        let got = cookies("cookie-space").await;
        assert_eq!(got.len(), 1, "{who}: {got:?}");
        assert!(got[0].ends_with(&scope), "{who}: {got:?}");
        assert!(!got[0].contains("Path =/"), "{who}: {got:?}");
        // Not text: dropped; the other cookie of the answer scoped.
        let got = cookies("cookie-binary").await;
        assert_eq!(got, vec![format!("t=2; {scope}")], "{who}");
        // The last `Path` is the one a browser keeps.
        let got = cookies("cookie-last-path").await;
        assert_eq!(got, vec![format!("s=1; {scope}")], "{who}");
        // No `=`: not a cookie, dropped.
        assert!(cookies("cookie-nameless").await.is_empty(), "{who}");
    }
}

#[tokio::test]
async fn websocket_handshakes_reach_the_workspace_once_and_only_as_ours() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       X-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n\
                       X-RStudio-Root-Path: /evil\r\n";

        // Refused: the refusal once, and what the client sent after its head never reaches
        // the workspace as a request.
        let mut request = side.get("/answer/refuse-ws", upgrade);
        request.extend_from_slice(b"EARLY-FRAME");
        let mut c = side.connect().await;
        c.send(&request).await;
        let a = c.answer().await.expect("the refusal");
        assert_eq!((a.status, &a.body[..]), (403, &b"refused"[..]), "{who}");
        assert!(c.silent(Duration::from_millis(300)).await, "{who}");
        drop(c);
        // Both are recorded before the workspace answers (a second send, or early bytes
        // passed on, would have come before the answer reached the client).
        assert_eq!(
            side.seen("/answer/refuse-ws").len(),
            1,
            "{who}: asked twice"
        );
        let records = side.records();
        assert!(
            !records
                .iter()
                .any(|r| r.to_string().contains("EARLY-FRAME")),
            "{who}: bytes after the handshake reached the workspace: {records:?}"
        );

        // Accepted: our head first, then what the client sent early, after the 101.
        let mut request = side.get("/ws", upgrade);
        request.extend_from_slice(b"early bytes");
        let mut c = side.connect().await;
        c.send(&request).await;
        let a = c.answer().await.expect("the 101");
        assert_eq!(a.status, 101, "{who}");
        assert!(c.fill(b"early bytes".len()).await, "{who}: no echo");
        assert_eq!(c.buf, b"early bytes", "{who}");
        let seen = side.seen("/ws");
        assert_eq!(seen.len(), 1, "{who}");
        let head = seen[0]["head"].as_str().unwrap().to_ascii_lowercase();
        assert!(!head.contains("6.6.6.6"), "{who}: {head}");
        assert!(!head.contains("/evil"), "{who}: {head}");
        assert!(!head.contains("rstudio-pool-session"), "{who}: {head}");
        assert!(!head.contains("x_forwarded_for"), "{who}: {head}");
        let tunnel: Vec<Value> = side
            .records()
            .into_iter()
            .filter(|r| r["conn"] == seen[0]["conn"] && r.get("tunnel").is_some())
            .collect();
        assert_eq!(tunnel.len(), 1, "{who}: {tunnel:?}");
        let raw: Vec<Value> = side
            .records()
            .into_iter()
            .filter(|r| r["conn"] == seen[0]["conn"] && r.get("raw").is_some())
            .collect();
        assert!(
            raw.is_empty(),
            "{who}: bytes reached the workspace before the 101: {raw:?}"
        );
        assert_eq!(tunnel[0]["tunnel"], "early bytes", "{who}");
    }
}

#[tokio::test]
async fn requests_are_sent_again_only_when_they_may_be() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        // A POST the workspace read and then closed its kept connection on: not sent again.
        let mut c = side.connect().await;
        c.send(&side.get("/first", "")).await;
        assert_eq!(c.answer().await.map(|a| a.status), Some(200), "{who}");
        let post = format!(
            "POST /{}/close-after-read HTTP/1.1\r\nHost: edge\r\nCookie: {}\r\nContent-Length: 4\r\n\r\nsave",
            side.id, side.cookie
        );
        c.send(post.as_bytes()).await;
        let a = c.answer().await;
        assert!(a.as_ref().is_none_or(|a| a.status == 502), "{who}: {a:?}");
        let posts: Vec<Value> = side
            .seen("/close-after-read")
            .into_iter()
            .filter(|r| r["method"] == "POST")
            .collect();
        assert_eq!(
            posts.len(),
            1,
            "{who}: the POST reached the workspace {} times",
            posts.len()
        );

        // The same with a GET: sent again on a new connection, and answered.
        let mut c = side.connect().await;
        c.send(&side.get("/first", "")).await;
        assert_eq!(c.answer().await.map(|a| a.status), Some(200), "{who}");
        c.send(&side.get("/close-after-read", "")).await;
        let a = c.answer().await.expect("an answer");
        assert_eq!((a.status, &a.body[..]), (200, &b"answered 0"[..]), "{who}");
    }
}

#[tokio::test]
async fn late_bytes_on_a_kept_connection_never_answer_the_next_request() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        let mut c = side.connect().await;
        c.send(&side.get("/late", "")).await;
        let a = c.answer().await.expect("an answer");
        assert_eq!(a.body, b"late", "{who}");
        // The workspace writes an answer nobody asked for on the kept connection.
        eventually(
            "the late bytes are sent",
            Duration::from_secs(10),
            || async {
                side.records()
                    .iter()
                    .any(|r| r.get("late").is_some())
                    .then_some(())
            },
        )
        .await;
        c.send(&side.get("/after", "")).await;
        let a = c.answer().await.expect("an answer");
        assert_ne!(
            a.body, b"forged",
            "{who}: late bytes answered the next request"
        );
        assert_eq!(a.status, 200, "{who}");
        assert_eq!(side.seen("/after").len(), 1, "{who}");
    }
}

#[tokio::test]
async fn header_names_with_underscores_never_reach_the_workspace() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        let request = side.get(
            "/underscores",
            "X_Forwarded_For: 6.6.6.6\r\nX_RStudio_Root_Path: /evil\r\nMy_Header: 1\r\nMy-Header: 2\r\n",
        );
        let a = side.ask(&request).await.expect("an answer");
        assert_eq!(a.status, 200, "{who}");
        let seen = side.seen("/underscores");
        assert_eq!(seen.len(), 1, "{who}");
        let head = seen[0]["head"].as_str().unwrap();
        for line in head.lines().skip(1) {
            let name = line.split(':').next().unwrap();
            assert!(!name.contains('_'), "{who}: {line:?} reached the workspace");
        }
        assert!(
            head.to_ascii_lowercase().contains("my-header: 2"),
            "{who}: {head}"
        );
    }
}

#[tokio::test]
async fn request_framings_reach_the_workspace_as_sent_or_are_refused() {
    let (edge, pingora) = sides().await;
    for side in [&edge, &pingora] {
        let who = side.name;
        let (id, cookie) = (&side.id, &side.cookie);
        // (name, raw request, the body the client meant: RFC 9112 reading)
        let corpus: Vec<(&str, String, &str)> = vec![
            ("get", format!("GET /{id}/f/get HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\n\r\n"), ""),
            ("post-length", format!("POST /{id}/f/post-length HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nContent-Length: 3\r\n\r\nabc"), "abc"),
            ("post-chunked", format!("POST /{id}/f/post-chunked HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "abc"),
            ("length-and-chunked", format!("POST /{id}/f/length-and-chunked HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "abc"),
            ("two-lengths", format!("POST /{id}/f/two-lengths HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"), "abc"),
            ("plus-length", format!("POST /{id}/f/plus-length HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nContent-Length: +3\r\n\r\nabc"), "abc"),
            ("http10", format!("GET /{id}/f/http10 HTTP/1.0\r\nHost: e\r\nCookie: {cookie}\r\n\r\n"), ""),
            ("expect", format!("POST /{id}/f/expect HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"), "abc"),
            ("bare-lf", format!("GET /{id}/f/bare-lf HTTP/1.1\nHost: e\nCookie: {cookie}\n\n"), ""),
            ("folded", format!("GET /{id}/f/folded HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nX-A: 1\r\n 2\r\n\r\n"), ""),
            ("space-before-colon", format!("GET /{id}/f/space-before-colon HTTP/1.1\r\nHost : e\r\nCookie: {cookie}\r\n\r\n"), ""),
            ("chunked-identity", format!("POST /{id}/f/chunked-identity HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "abc"),
            ("two-hosts", format!("GET /{id}/f/two-hosts HTTP/1.1\r\nHost: e\r\nHost: f\r\nCookie: {cookie}\r\n\r\n"), ""),
            ("nul-in-header", format!("GET /{id}/f/nul-in-header HTTP/1.1\r\nHost: e\r\nX-A: a\0b\r\nCookie: {cookie}\r\n\r\n"), ""),
            ("pipelined", format!("GET /{id}/f/pipelined HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\n\r\nGET /{id}/f/pipelined-2 HTTP/1.1\r\nHost: e\r\nCookie: {cookie}\r\n\r\n"), ""),
        ];
        let mut table = Vec::new();
        for (name, request, body) in &corpus {
            let mut c = side.connect().await;
            c.send(request.as_bytes()).await;
            let a = c.answer().await;
            let status = a.as_ref().map(|a| a.status);
            // The workspace records a request before it answers it.
            let seen = side.seen(&format!("/f/{name}"));
            for record in &seen {
                assert!(record.get("error").is_none(), "{who} {name}: {record}");
                assert_eq!(record["body"], *body, "{who} {name}: {record}");
            }
            match status {
                Some(s) if (200..300).contains(&s) => {
                    assert_eq!(seen.len(), 1, "{who} {name}: answered {s}, seen {seen:?}")
                }
                // Refused by the proxy: the workspace saw nothing.
                Some(s) if (400..500).contains(&s) => {
                    assert!(
                        seen.is_empty(),
                        "{who} {name}: refused {s}, yet seen {seen:?}"
                    )
                }
                other => panic!("{who} {name}: {other:?}"),
            }
            table.push(format!("{name}: {}", status.unwrap_or(0)));
        }
        println!("{who}: {}", table.join(", "));
    }
}

#[tokio::test]
async fn slow_heads_get_408_and_connections_are_capped() {
    let side = side(true, "  max_connections: 8\n").await;
    // A head that never finishes: 408 once its deadline passes, then the connection closes.
    let mut c = side.connect().await;
    c.send(b"GET / HTTP/1.1\r\nHost: e\r\n").await;
    let started = std::time::Instant::now();
    let a = c.answer().await.expect("an answer");
    assert_eq!(a.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(HEAD_TIMEOUT_MS - 100));
    assert!(c.silent(Duration::from_secs(2)).await && c.closed);

    // A byte a second keeps no head alive past the deadline either.
    let mut c = side.connect().await;
    let dribble = async {
        for b in b"GET / HTTP/1.1\r\nX-Slow: 1111111111111111".iter() {
            if c.stream.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(HEAD_TIMEOUT_MS + 1000), dribble).await;
    let a = c.answer().await;
    assert_eq!(a.map(|a| a.status), Some(408));

    // At the limit, a new connection is answered 503 at once; a freed place is taken again.
    // (The test's HTTP client may hold a connection of its own from the link exchange.)
    let mut held = Vec::new();
    let refused = loop {
        let mut c = side.connect().await;
        c.send(&side.get("/held", "")).await;
        let a = c.answer().await.expect("an answer");
        if a.status == 503 {
            break a;
        }
        assert_eq!(a.status, 200);
        held.push(c);
        assert!(
            held.len() <= 8,
            "more connections than proxy.max_connections"
        );
    };
    assert!(held.len() >= 7, "refused at {}", held.len());
    assert!(String::from_utf8_lossy(&refused.body).contains("connections"));
    assert!(side.server.log().contains("max_connections"));
    held.pop();
    eventually("a place is free again", Duration::from_secs(10), || async {
        let mut c = side.connect().await;
        c.send(&side.get("/again", "")).await;
        c.answer().await.filter(|a| a.status == 200).map(|_| ())
    })
    .await;
}
