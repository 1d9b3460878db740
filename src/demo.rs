//! The built-in demo workspace (`rstudio-pool demo-workspace --port N`): the workload of the
//! embedded default and of the tests. It behaves like RStudio wherever a proxy can tell:
//!
//! - `GET /` an HTML page naming its instance, with a session cookie scoped to the root path
//!   (`X-RStudio-Root-Path`, as RStudio scopes its cookies);
//! - `GET /images/favicon.ico`, RStudio's readiness probe target;
//! - `GET /redirect` redirects to `<root path>/landed`, honouring `X-RStudio-Root-Path`;
//!   `GET /redirect-absolute` redirects to `http://<Host>/landed`, as an app that knows nothing
//!   of the prefix would, and `GET /redirect-root` to `/landed`;
//! - `POST /events/get_events` long-polls, answering after a while with nothing new;
//! - `POST /upload` streams the body and answers its size;
//! - `GET /headers` (and any `GET /echo/...`; `HEAD` too) echoes the request line and headers it received
//!   as JSON;
//! - `GET /ws` is a WebSocket echo; the message `?headers` is answered with the handshake's
//!   headers as the workspace received them, as JSON;
//! - `GET /stream?chunks=N&size=S[&gap_ms=G]` answers N pieces of S bytes, each sent on its
//!   own G ms apart (chunked encoding; 2 ms by default), as a workspace streaming output does;
//! - `GET /notes` answers the notes saved in its working folder (`notes.txt`), `PUT /notes`
//!   saves them, and the page shows them: the user's work that a pause must keep;
//! - `GET /connections` counts the HTTP connections accepted and closed so far, and
//!   `POST /close-idle` closes every connection as soon as it is idle, as a workspace whose
//!   keep-alive timeout ran out would. The tests use these to see a proxy's kept connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The user's notes, in the workspace's working folder.
const NOTES: &str = "notes.txt";

/// Options of the demo workspace.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// The port to listen on.
    #[arg(long)]
    pub port: u16,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// The instance this workspace serves, shown on its page.
    #[arg(long, default_value = "i-00000000")]
    pub instance_id: String,
    /// How long `POST /events/get_events` holds a request before answering, in milliseconds.
    #[arg(long, default_value_t = 25_000)]
    pub long_poll_ms: u64,
}

/// Serves until the process is stopped.
pub async fn run(options: DemoOptions) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(options.host, options.port)).await?;
    log::info!(
        "demo workspace {} listening on {}",
        options.instance_id,
        listener.local_addr()?
    );
    let shared = Arc::new(Shared {
        options,
        accepted: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        close_idle: tokio::sync::watch::channel(0).0,
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = Arc::clone(&shared);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut close_idle = shared.close_idle.subscribe();
            let handler = Arc::clone(&shared);
            let service = service_fn(move |req| handle(req, Arc::clone(&handler)));
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    changed = close_idle.changed(), if !closing => {
                        closing = changed.is_ok();
                        if closing {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            shared.closed.fetch_add(1, Ordering::SeqCst);
        });
    }
}

/// What the workspace's connections share.
struct Shared {
    options: DemoOptions,
    accepted: AtomicU64,
    closed: AtomicU64,
    /// Bumped by `POST /close-idle`.
    close_idle: tokio::sync::watch::Sender<u64>,
}

type Reply = Response<BoxBody<Bytes, Infallible>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}

fn redirect(location: &str) -> Reply {
    let mut response = reply(StatusCode::FOUND, "text/plain", "redirecting\n");
    if let Ok(v) = location.parse() {
        response.headers_mut().insert(http::header::LOCATION, v);
    }
    response
}

async fn handle(mut req: Request<Incoming>, shared: Arc<Shared>) -> Result<Reply, Infallible> {
    let options = &shared.options;
    let root = req
        .headers()
        .get("x-rstudio-root-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned();
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let response = match (method.as_str(), path.as_str()) {
        ("GET", "/") => {
            let notes = tokio::fs::read_to_string(NOTES).await.unwrap_or_default();
            let notes_path = format!("{root}/notes");
            let page = format!(
                "<!doctype html><html><head><title>Demo workspace {id}</title></head>\
                 <body><h1>Demo workspace</h1><p>This is instance <code id=\"instance\">{id}</code>.</p>\
                 <p>Root path: <code>{root}</code></p>\
                 <p>Your notes (<code>PUT {notes_path}</code> saves them):</p><pre id=\"notes\">{notes}</pre></body></html>\n",
                id = options.instance_id,
                root = if root.is_empty() { "/" } else { &root },
                notes_path = notes_path,
                notes = notes
                    .replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;"),
            );
            let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", page);
            let cookie_path = if root.is_empty() { "/" } else { &root };
            let cookie = format!(
                "demo-session={:016x}; Path={cookie_path}; HttpOnly; SameSite=Lax",
                rand::random::<u64>()
            );
            if let Ok(v) = cookie.parse() {
                r.headers_mut().insert(http::header::SET_COOKIE, v);
            }
            r
        }
        ("GET", "/notes") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            tokio::fs::read(NOTES).await.unwrap_or_default(),
        ),
        ("PUT", "/notes") => match req.into_body().collect().await {
            Ok(body) => match tokio::fs::write(NOTES, body.to_bytes()).await {
                Ok(()) => reply(StatusCode::OK, "text/plain", "saved\n"),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("cannot save the notes: {e}\n"),
                ),
            },
            Err(_) => reply(StatusCode::BAD_REQUEST, "text/plain", "no body\n"),
        },
        ("GET", "/images/favicon.ico") => reply(StatusCode::OK, "image/x-icon", &b"\0\0\x01\0"[..]),
        ("GET", "/redirect") => redirect(&format!("{root}/landed")),
        ("GET", "/redirect-root") => redirect("/landed"),
        ("GET", "/redirect-absolute") => {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            redirect(&format!("http://{host}/landed"))
        }
        ("GET", "/landed") => reply(StatusCode::OK, "text/plain", "landed\n"),
        ("POST", "/events/get_events") => {
            let _ = req.into_body().collect().await;
            tokio::time::sleep(Duration::from_millis(options.long_poll_ms)).await;
            reply(StatusCode::OK, "application/json", r#"{"result":[]}"#)
        }
        (_, "/upload") => {
            let mut body = req.into_body();
            let mut bytes: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            bytes += data.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            reply(
                StatusCode::OK,
                "application/json",
                format!("{{\"bytes\":{bytes}}}"),
            )
        }
        ("GET" | "HEAD", p) if p == "/headers" || p.starts_with("/echo/") => {
            let body = serde_json::json!({
                "method": method.as_str(),
                "uri": req.uri().to_string(),
                "headers": headers_json(req.headers()),
                "instanceId": options.instance_id,
            });
            reply(StatusCode::OK, "application/json", body.to_string())
        }
        ("GET", "/ws") => upgrade(&mut req),
        ("GET", "/stream") => {
            let param = |name: &str| {
                req.uri()
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(1)
            };
            let (chunks, size) = (param("chunks").min(10_000), param("size").min(1 << 20));
            let gap = Duration::from_millis(
                if req.uri().query().unwrap_or_default().contains("gap_ms=") {
                    param("gap_ms").min(60_000) as u64
                } else {
                    2
                },
            );
            let pieces = futures_util::stream::iter(0..chunks).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let piece = Bytes::from(vec![b'a' + (i % 26) as u8; size]);
                Ok::<_, Infallible>(hyper::body::Frame::data(piece))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(pieces)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        ("GET", "/connections") => {
            let body = serde_json::json!({
                "accepted": shared.accepted.load(Ordering::SeqCst),
                "closed": shared.closed.load(Ordering::SeqCst),
            });
            reply(StatusCode::OK, "application/json", body.to_string())
        }
        ("POST", "/close-idle") => {
            shared.close_idle.send_modify(|n| *n += 1);
            reply(StatusCode::OK, "text/plain", "closing idle connections\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(response)
}

fn headers_json(headers: &http::HeaderMap) -> serde_json::Value {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Answers a WebSocket handshake and echoes every text and binary message on the socket.
fn upgrade(req: &mut Request<Incoming>) -> Reply {
    let is_upgrade = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected a WebSocket upgrade\n",
        );
    };
    if !is_upgrade {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected a WebSocket upgrade\n",
        );
    }
    // Asked for over the socket, the handshake's headers as the workspace received them.
    let handshake = headers_json(req.headers()).to_string();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                log::warn!("the WebSocket upgrade failed: {e}");
                return;
            }
        };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(message) = socket.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("the WebSocket failed: {e}");
                    break;
                }
            };
            if message.to_text().ok() == Some("?headers") {
                if socket.send(Message::text(handshake.clone())).await.is_err() {
                    break;
                }
            } else if message.is_text() || message.is_binary() {
                if socket.send(message).await.is_err() {
                    break;
                }
            } else if message.is_close() {
                break;
            }
        }
    });
    let mut response = reply(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let headers = response.headers_mut();
    headers.remove(http::header::CONTENT_TYPE);
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = derive_accept_key(key.as_bytes()).parse() {
        headers.insert("sec-websocket-accept", v);
    }
    response
}
