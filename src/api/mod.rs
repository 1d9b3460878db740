//! The command API as a Pingora listening service: `POST /` with the original service's JSON
//! commands, plus `GET /healthz`, `GET /metrics` (Prometheus) and the admin page under
//! `/admin` ([`admin`]). Decoding is the pure [`crate::core::command::decode`]; this
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

pub mod admin;

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
use crate::manager::{End, ManagerError, PoolManager};
use crate::metrics::metrics;
use crate::provider::{TAG_PURPOSE, TAG_USER};
use admin::{Admin, Reply, Signed};

/// How long a caller may take to send the rest of a request it began: Pingora's default.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct CommandApi {
    manager: Arc<PoolManager>,
    token: Option<String>,
    max_body_bytes: usize,
    admin: Admin,
    /// The currency of the costs (`pool.currency`), for the admin page.
    currency: String,
}

/// What the route of a request reads of its head.
pub struct Asked<'a> {
    pub method: &'a [u8],
    pub path: &'a str,
    pub authorization: Option<&'a [u8]>,
    /// The `Cookie` header, for the admin session.
    pub cookies: Option<&'a str>,
    /// The `X-CSRF-Token` header, for admin actions.
    pub csrf: Option<&'a str>,
}

/// An admin request that needs its body.
enum AdminPost {
    Login,
    Logout(Signed),
    Act(Action),
}

/// What an operator can do to an instance from the admin page.
#[derive(Debug, Clone, Copy)]
enum Action {
    Terminate,
    Pause,
    Resume,
}

impl CommandApi {
    pub fn new(manager: Arc<PoolManager>, token: Option<String>, max_body_bytes: usize) -> Self {
        Self {
            manager,
            admin: Admin::new(token.clone()),
            token,
            max_body_bytes,
            currency: "USD".into(),
        }
    }

    /// Names the currency of the purposes' `hourly_cost` on the admin page.
    pub fn with_currency(mut self, currency: &str) -> Self {
        self.currency = currency.to_owned();
        self
    }

    /// Where a request goes, from its head alone: an answer at once, or a command (or admin
    /// form) to run once its body is read.
    fn route(&self, asked: &Asked<'_>) -> Route {
        let Asked {
            method,
            path,
            authorization,
            ..
        } = *asked;
        if path == "/admin" || path.starts_with("/admin/") {
            return self.admin_route(asked);
        }
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
            (b"GET", "/metrics") => {
                self.manager.observe();
                Route::Reply(Reply {
                    status: StatusCode::OK,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: metrics().render(),
                    headers: Vec::new(),
                })
            }
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

    /// The admin page's routes: a session from the login form, CSRF tokens on actions.
    fn admin_route(&self, asked: &Asked<'_>) -> Route {
        let signed = self.admin.signed_in(asked.cookies);
        let reply = match (asked.method, asked.path, signed) {
            (b"GET", "/admin", signed) => self.admin.page(signed.as_ref()),
            (b"POST", "/admin/login", _) => return Route::Admin(AdminPost::Login),
            (b"POST", "/admin/logout", Some(signed)) => {
                return Route::Admin(AdminPost::Logout(signed))
            }
            (b"GET" | b"POST", "/admin/state" | "/admin/logout", None) => self.admin.refused(),
            (b"GET", "/admin/state", Some(_)) => Reply::json(StatusCode::OK, &self.admin_state()),
            (b"POST", action, signed) if action_of(action).is_some() => {
                let Some(signed) = signed else {
                    return Route::Reply(self.admin.refused());
                };
                if !self.admin.csrf_matches(&signed, asked.csrf) {
                    Reply::json(
                        StatusCode::FORBIDDEN,
                        &json!({"error": "missing or wrong CSRF token: send the page's csrf-token in X-CSRF-Token"}),
                    )
                } else {
                    return Route::Admin(AdminPost::Act(action_of(action).expect("checked")));
                }
            }
            _ => Reply::json(
                StatusCode::NOT_FOUND,
                &json!({"error": "no such admin endpoint: open /admin"}),
            ),
        };
        Route::Reply(reply)
    }

    /// What `/admin/state` answers: pools, instances, the last events.
    fn admin_state(&self) -> Value {
        let paused = self.manager.paused_launches();
        let limits = self.manager.limits();
        let pools: Map<String, Value> = self
            .manager
            .census()
            .into_iter()
            .map(|(purpose, census)| {
                let mut value = serde_json::to_value(census).unwrap_or_default();
                if let Some((min_free, max)) = limits.get(&purpose) {
                    value["minFree"] = json!(min_free);
                    value["max"] = json!(max);
                }
                value["launchesPaused"] = json!(paused.get(&purpose));
                (purpose, value)
            })
            .collect();
        json!({
            "pools": pools,
            "costs": self.manager.costs(),
            "currency": self.currency,
            "instances": self.manager.instances(),
            "events": crate::audit::recent(50),
        })
    }

    /// Runs an admin form or action once its body is read.
    async fn admin_post(&self, post: AdminPost, body: &[u8]) -> Reply {
        match post {
            AdminPost::Login => self.admin.login(body),
            AdminPost::Logout(signed) => {
                let presented = admin::form_value(body, "csrf");
                if self.admin.csrf_matches(&signed, presented.as_deref()) {
                    self.admin.logout(&signed)
                } else {
                    Reply::json(
                        StatusCode::FORBIDDEN,
                        &json!({"error": "missing or wrong CSRF token"}),
                    )
                }
            }
            AdminPost::Act(action) => {
                let id = serde_json::from_slice::<Value>(body)
                    .ok()
                    .and_then(|v| v["instanceId"].as_str().map(str::to_owned));
                let Some(id) = id.and_then(|id| crate::core::ids::InstanceId::parse(&id).ok())
                else {
                    return Reply::json(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "send {\"instanceId\": \"i-...\"} as the JSON body"}),
                    );
                };
                let result = match action {
                    Action::Terminate => self.manager.terminate(&id, End::Admin).await,
                    Action::Pause => self.manager.pause_now(&id).await,
                    Action::Resume => self.manager.resume_now(&id).await,
                };
                let (status, value) = match result {
                    Ok(()) => (StatusCode::OK, json!({"status": "OK"})),
                    Err(e) => manager_error(e),
                };
                Reply::json(status, &value)
            }
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
    async fn handle(&self, session: &mut ServerSession) -> Reply {
        let req = session.req_header();
        let header =
            |name: http::header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        let route = self.route(&Asked {
            method: req.method.as_str().as_bytes(),
            path: req.uri.path(),
            authorization: req
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            cookies: header(http::header::COOKIE),
            csrf: header(http::header::HeaderName::from_static("x-csrf-token")),
        });
        match route {
            Route::Answer((status, value)) => Reply::json(status, &value),
            Route::Reply(reply) => reply,
            Route::Command => match self.read_body(session).await {
                Ok(body) => {
                    let (status, value) = self.command(&body).await;
                    Reply::json(status, &value)
                }
                Err((status, value)) => Reply::json(status, &value),
            },
            Route::Admin(post) => match self.read_body(session).await {
                Ok(body) => self.admin_post(post, &body).await,
                Err((status, value)) => Reply::json(status, &value),
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
                        let id = &assignment.instance_id;
                        let ready = self.manager.wait_ready(id, limit).await;
                        match self.manager.failure(id).filter(|_| !ready) {
                            // It died while starting: say why, rather than answer with the
                            // instance launched in its place as if nothing happened.
                            Some(failure) => Err(ManagerError::LaunchFailed(format!(
                                "instance {id} failed to start: {}",
                                failure.reason
                            ))),
                            // Asked again: the same instance, with its status now.
                            None => self.manager.request(&user, purpose).await,
                        }
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
                let mut pools = json!(self.manager.census());
                // What each pool costs, beside its counts.
                for (purpose, cost) in self.manager.costs() {
                    if let Some(pool) = pools.get_mut(&purpose).and_then(Value::as_object_mut) {
                        pool.insert("cost".into(), cost);
                    }
                }
                let mut answer = json!({
                    "instances": self.manager.assigned(),
                    "pools": pools,
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
    Reply(Reply),
    Command,
    Admin(AdminPost),
}

/// The admin action a path names.
fn action_of(path: &str) -> Option<Action> {
    match path {
        "/admin/terminate" => Some(Action::Terminate),
        "/admin/pause" => Some(Action::Pause),
        "/admin/resume" => Some(Action::Resume),
        _ => None,
    }
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
        | ManagerError::Recovering
        | ManagerError::HandingOver => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::NotPausable(_) => StatusCode::CONFLICT,
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
fn answer_headers(reply: &Reply, mut header: impl FnMut(&str, &[u8])) {
    header("Content-Type", reply.content_type.as_bytes());
    header("Content-Length", reply.body.len().to_string().as_bytes());
    header("Cache-Control", b"no-store");
    if reply.status == StatusCode::UNAUTHORIZED && reply.content_type == "application/json" {
        header("WWW-Authenticate", b"Bearer");
    }
    for (name, value) in &reply.headers {
        header(name, value.as_bytes());
    }
}

#[async_trait]
impl ServeHttp for CommandApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let reply = self.handle(session).await;
        let mut response = Response::builder().status(reply.status);
        answer_headers(&reply, |name, value| {
            response = std::mem::take(&mut response).header(name, value);
        });
        response
            .body(reply.body)
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
                    let body = &conn.input[head_len..total];
                    let reply = match route {
                        Route::Answer((status, value)) => Reply::json(status, &value),
                        Route::Reply(reply) => reply,
                        Route::Command => {
                            let (status, value) = self.api.command(body).await;
                            Reply::json(status, &value)
                        }
                        Route::Admin(post) => self.api.admin_post(post, body).await,
                    };
                    conn.input.drain(..total);
                    let close = close || *shutdown.borrow();
                    render(&reply, close, &mut conn.out);
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
        // The headers the route reads, in one pass; any of them twice: Pingora decides.
        let (mut authorization, mut cookies, mut csrf) = (None, None, None);
        for header in req.headers.iter() {
            let slot = if header.name.eq_ignore_ascii_case("authorization") {
                &mut authorization
            } else if header.name.eq_ignore_ascii_case("cookie") {
                &mut cookies
            } else if header.name.eq_ignore_ascii_case("x-csrf-token") {
                &mut csrf
            } else {
                continue;
            };
            if slot.replace(header.value).is_some() {
                return Some(Plan::Pingora);
            }
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        Some(Plan::Here {
            head_len,
            body_len,
            close,
            route: self.api.route(&Asked {
                method: method.as_bytes(),
                path,
                authorization,
                cookies: cookies.and_then(|v| std::str::from_utf8(v).ok()),
                csrf: csrf.and_then(|v| std::str::from_utf8(v).ok()),
            }),
        })
    }
}

/// An answer, head and body, as the caller gets it.
fn render(reply: &Reply, close: bool, out: &mut Vec<u8>) {
    let status = reply.status;
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
    answer_headers(reply, &mut line);
    line("Date", get_cached_date().as_bytes());
    line("Connection", if close { b"close" } else { b"keep-alive" });
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&reply.body);
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
