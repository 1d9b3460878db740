//! The command API as a Pingora listening service: `POST /` with the original service's JSON
//! commands, plus `GET /healthz`. Decoding is the pure [`crate::core::command::decode`]; this
//! module reads the body within its limit, checks the bearer token and maps outcomes to
//! statuses: 400 for a caller's mistake, 401 without credentials, 404 for an unknown instance,
//! 413 for an oversized body, 429 when the pool is full, 503 when the provider fails.
//!
//! [`ApiServer`] reads each request itself, as the edge does: a plain HTTP/1.1 request with a
//! body of known length within the limit is answered here, with one read and one write;
//! anything else (chunked bodies, `Expect`, HTTP/1.0, malformed or oversized requests) is
//! put back in front of the stream for Pingora's HTTP server, which answers it through the
//! same [`CommandApi`]. Why: Pingora's HTTP path alone put a burst of 200 callers at 5 ms
//! p99 (`GET /healthz`, benches/load.sh), which was the whole budget of an assignment.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use serde_json::{json, Map, Value};

use crate::config::DEFAULT_PURPOSE;
use crate::core::auth::{bearer, token_matches};
use crate::core::command::{decode, Command};
use crate::core::pool::PoolError;
use crate::http1::conn::{Connection, Limits};
use crate::http1::request::{plain_request, PlainRequest};
use crate::http1::MAX_HEADERS;
use crate::manager::{ManagerError, PoolManager};
use crate::provider::{TAG_PURPOSE, TAG_USER};

/// How long a caller may take to send the rest of a request it began: Pingora's default.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct CommandApi {
    manager: Arc<PoolManager>,
    token: Option<String>,
    max_body_bytes: usize,
}

impl CommandApi {
    pub fn new(manager: Arc<PoolManager>, token: Option<String>, max_body_bytes: usize) -> Self {
        Self {
            manager,
            token,
            max_body_bytes,
        }
    }

    /// Where a request goes, from its method, path and `Authorization` header alone: an
    /// answer at once, or a command to run once its body is read.
    fn route(&self, method: &[u8], path: &str, authorization: Option<&[u8]>) -> Route {
        // The health check tells only whether the pool is up; load balancers ask it without
        // credentials.
        if let Some(expected) = self.token.as_ref().filter(|_| path != "/healthz") {
            let presented = authorization.and_then(bearer);
            if !presented.is_some_and(|p| token_matches(p, expected.as_bytes())) {
                return Route::Answer(error(
                    StatusCode::UNAUTHORIZED,
                    "send the API token as `Authorization: Bearer <API_TOKEN>`",
                ));
            }
        }
        match (method, path) {
            (b"GET" | b"HEAD", "/healthz") => Route::Answer((
                StatusCode::OK,
                json!({"status": "ok", "recovered": self.manager.is_recovered()}),
            )),
            (b"POST", "/") => Route::Command,
            (_, "/") => Route::Answer(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "send commands with POST / and a JSON body",
            )),
            _ => Route::Answer(error(
                StatusCode::NOT_FOUND,
                "no such endpoint: send commands with POST /",
            )),
        }
    }

    /// A command body over the limit.
    fn too_large(&self) -> (StatusCode, Value) {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the body is larger than {} bytes; commands are small JSON objects",
                self.max_body_bytes
            ),
        )
    }

    /// Pingora's path: the request as Pingora read it.
    async fn handle(&self, session: &mut ServerSession) -> (StatusCode, Value) {
        let req = session.req_header();
        let route = self.route(
            req.method.as_str().as_bytes(),
            req.uri.path(),
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match route {
            Route::Answer(answer) => answer,
            Route::Command => match self.read_body(session).await {
                Ok(body) => self.command(&body).await,
                Err(answer) => answer,
            },
        }
    }

    async fn read_body(&self, session: &mut ServerSession) -> Result<Vec<u8>, (StatusCode, Value)> {
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            // The rest of the body stays unread: the connection cannot be reused.
            session.set_keepalive(None);
            return Err(self.too_large());
        }
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_body_bytes {
                        session.set_keepalive(None);
                        return Err(self.too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.to_vec()),
                Err(e) => {
                    session.set_keepalive(None);
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        &format!("the request body could not be read: {e}"),
                    ));
                }
            }
        }
    }

    async fn command(&self, body: &[u8]) -> (StatusCode, Value) {
        let command = match decode(body) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        match command {
            Command::RequestRstudio {
                user,
                purpose,
                wait,
            } => {
                let purpose = purpose.as_deref().unwrap_or(DEFAULT_PURPOSE);
                let result = match self.manager.request(&user, purpose).await {
                    Ok(assignment) if !assignment.ready && wait.is_some_and(|w| w > 0) => {
                        let limit = std::time::Duration::from_secs(wait.unwrap_or(0));
                        self.manager
                            .wait_ready(&assignment.instance_id, limit)
                            .await;
                        // Asked again: the same instance, with its status now.
                        self.manager.request(&user, purpose).await
                    }
                    other => other,
                };
                match result {
                    Ok(assignment) => (
                        StatusCode::OK,
                        serde_json::to_value(assignment).unwrap_or(Value::Null),
                    ),
                    Err(e) => manager_error(e),
                }
            }
            // Before the pool is rebuilt after a start, an empty list would read as "nobody
            // holds an instance": answer 503 like the other commands.
            Command::GetStatus { .. } if self.manager.wait_recovered().await.is_err() => {
                manager_error(ManagerError::Recovering)
            }
            Command::GetStatus { instance: None } => {
                let mut answer = json!({
                    "instances": self.manager.assigned(),
                    "pools": self.manager.census(),
                });
                let paused = self.manager.paused_launches();
                if !paused.is_empty() {
                    answer["launchesPaused"] = json!(paused);
                }
                (StatusCode::OK, answer)
            }
            Command::GetStatus { instance: Some(id) } => match self.manager.instance(&id) {
                Some(view) => {
                    let mut out = Map::new();
                    // Tags first, so that the fields below win over a tag of the same name.
                    for (k, v) in &view.record.tags {
                        out.insert(k.clone(), json!(v));
                    }
                    out.insert("instanceId".into(), json!(view.id));
                    out.insert(
                        "url".into(),
                        json!(view.record.address.as_ref().map(|a| format!("http://{a}"))),
                    );
                    out.insert("keyName".into(), json!(view.record.key_name));
                    out.insert(TAG_PURPOSE.into(), json!(view.purpose));
                    out.insert("purpose".into(), json!(view.purpose));
                    out.insert(
                        TAG_USER.into(),
                        json!(view.owner.as_ref().map(|u| u.as_str())),
                    );
                    out.insert(
                        "state".into(),
                        json!(format!("{:?}", view.phase).to_lowercase()),
                    );
                    out.insert("proxyUrl".into(), json!(self.manager.user_url(&view.id)));
                    (StatusCode::OK, json!({ "instance": out }))
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    &format!("instance {id} is not in the pool (never was, or already terminated)"),
                ),
            },
            Command::Delete { instance } => match self.manager.delete(&instance).await {
                Ok(()) => (StatusCode::OK, json!({"status": "OK"})),
                Err(e) => manager_error(e),
            },
        }
    }
}

/// Where a request goes: see [`CommandApi::route`].
enum Route {
    Answer((StatusCode, Value)),
    Command,
}

fn error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (status, json!({ "error": message }))
}

fn manager_error(e: ManagerError) -> (StatusCode, Value) {
    let status = match &e {
        ManagerError::UnknownPurpose { .. } => StatusCode::BAD_REQUEST,
        ManagerError::Pool(PoolError::Full { .. } | PoolError::FullForResume { .. }) => {
            StatusCode::TOO_MANY_REQUESTS
        }
        ManagerError::Pool(PoolError::UnknownInstance(_)) => StatusCode::NOT_FOUND,
        ManagerError::Pool(PoolError::UnknownTicket(_)) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::Provider(_)
        | ManagerError::LaunchFailed(_)
        | ManagerError::LaunchesPaused(_)
        | ManagerError::ResumeFailed(_)
        | ManagerError::Recording(_)
        | ManagerError::Recovering => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = match &e {
        ManagerError::Pool(PoolError::UnknownInstance(id)) => {
            format!("instance {id} is not in the pool (never was, or already terminated)")
        }
        _ => e.to_string(),
    };
    error(status, &message)
}

/// The headers of every answer, on either path.
fn answer_headers(status: StatusCode, length: usize, mut header: impl FnMut(&str, &[u8])) {
    header("Content-Type", b"application/json");
    header("Content-Length", length.to_string().as_bytes());
    header("Cache-Control", b"no-store");
    if status == StatusCode::UNAUTHORIZED {
        header("WWW-Authenticate", b"Bearer");
    }
}

#[async_trait]
impl ServeHttp for CommandApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, body) = self.handle(session).await;
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::builder().status(status);
        answer_headers(status, bytes.len(), |name, value| {
            response = std::mem::take(&mut response).header(name, value);
        });
        response
            .body(bytes)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// The command listener's connection handler: plain requests answered here, the rest by
/// Pingora's HTTP server (see the module's comment).
pub struct ApiServer {
    api: Arc<CommandApi>,
}

/// What to do with the request at the front of a connection.
enum Plan {
    /// Answered here once `head_len + body_len` bytes are in.
    Here {
        head_len: usize,
        body_len: usize,
        /// The caller asked for `Connection: close`.
        close: bool,
        route: Route,
    },
    Pingora,
}

impl ApiServer {
    pub fn new(api: CommandApi) -> Self {
        Self { api: Arc::new(api) }
    }

    async fn serve(&self, client: Box<L4Stream>, shutdown: &ShutdownWatch) {
        let mut conn = Connection::new(client, None);
        let mut first = true;
        loop {
            let limit = Some(READ_TIMEOUT);
            let limits = Limits {
                head: limit,
                read: limit,
            };
            let next = conn.next_head(
                first,
                shutdown,
                limits,
                |conn| self.plan(conn),
                Plan::Pingora,
            );
            let Some(plan) = next.await else {
                return;
            };
            first = false;
            match plan {
                Plan::Here {
                    head_len,
                    body_len,
                    close,
                    route,
                } => {
                    let total = head_len + body_len;
                    if !conn.read_to(total, limit).await {
                        return;
                    }
                    let (status, value) = match route {
                        Route::Answer(answer) => answer,
                        Route::Command => self.api.command(&conn.input[head_len..total]).await,
                    };
                    conn.input.drain(..total);
                    let close = close || *shutdown.borrow();
                    render(status, &value, close, &mut conn.out);
                    if !conn.send_out().await || close {
                        return;
                    }
                }
                Plan::Pingora => {
                    if !conn.through_pingora(&self.api, shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Plans the request whose head is at the front of the connection's input; `None` while
    /// the head is incomplete. Only what Pingora would read the same way is answered here.
    fn plan(&self, conn: &mut Connection) -> Option<Plan> {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(&conn.input, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(Plan::Pingora),
        };
        let Some(PlainRequest {
            method,
            target,
            body_len,
            close,
        }) = plain_request(&req)
        else {
            return Some(Plan::Pingora);
        };
        // Other methods (`HEAD` answers without its body) are Pingora's to answer, and so is
        // a body over the limit (413, and the connection closes with the body unread).
        if !matches!(method, "GET" | "POST") || body_len > self.api.max_body_bytes {
            return Some(Plan::Pingora);
        }
        let mut authorizations = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("authorization"));
        let authorization = authorizations.next().map(|h| h.value);
        if authorizations.next().is_some() {
            return Some(Plan::Pingora);
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        Some(Plan::Here {
            head_len,
            body_len,
            close,
            route: self.api.route(method.as_bytes(), path, authorization),
        })
    }
}

/// An answer, head and body, as the caller gets it.
fn render(status: StatusCode, value: &Value, close: bool, out: &mut Vec<u8>) {
    let body = serde_json::to_vec(value).unwrap_or_default();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut line = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    answer_headers(status, body.len(), &mut line);
    line("Date", get_cached_date().as_bytes());
    line("Connection", if close { b"close" } else { b"keep-alive" });
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
}

#[async_trait]
impl ServerApp for ApiServer {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // TLS or other transports: Pingora alone.
        if !stream.as_any().is::<L4Stream>() {
            return ServerApp::process_new(&self.api, stream, shutdown).await;
        }
        let client: Box<L4Stream> = stream.into_any().downcast().ok()?;
        self.serve(client, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.api).await
    }
}
