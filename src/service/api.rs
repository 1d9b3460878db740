//! The command API as a Pingora listening service: `POST /` with the original service's JSON
//! commands, plus `GET /healthz`. Decoding is the pure [`crate::core::command::decode`]; this
//! module reads the body within its limit, checks the bearer token and maps outcomes to
//! statuses: 400 for a caller's mistake, 401 without credentials, 404 for an unknown instance,
//! 413 for an oversized body, 429 when the pool is full, 503 when the provider fails.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Map, Value};

use super::manager::{ManagerError, PoolManager};
use crate::config::DEFAULT_PURPOSE;
use crate::core::auth::{bearer, token_matches};
use crate::core::command::{decode, Command};
use crate::core::pool::PoolError;
use crate::provider::{TAG_PURPOSE, TAG_USER};

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

    async fn handle(&self, session: &mut ServerSession) -> (StatusCode, Value) {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        // The health check tells only whether the pool is up; load balancers ask it without
        // credentials.
        if let Some(expected) = self.token.as_ref().filter(|_| path != "/healthz") {
            let presented = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| bearer(v.as_bytes()));
            if !presented.is_some_and(|p| token_matches(p, expected.as_bytes())) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "send the API token as `Authorization: Bearer <API_TOKEN>`",
                );
            }
        }
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => (
                StatusCode::OK,
                json!({"status": "ok", "recovered": self.manager.is_recovered()}),
            ),
            (Method::POST, "/") => match self.read_body(session).await {
                Ok(body) => self.command(&body).await,
                Err(answer) => answer,
            },
            (_, "/") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "send commands with POST / and a JSON body",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "no such endpoint: send commands with POST /",
            ),
        }
    }

    async fn read_body(&self, session: &mut ServerSession) -> Result<Vec<u8>, (StatusCode, Value)> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the body is larger than {} bytes; commands are small JSON objects",
                    self.max_body_bytes
                ),
            )
        };
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            // The rest of the body stays unread: the connection cannot be reused.
            session.set_keepalive(None);
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_body_bytes {
                        session.set_keepalive(None);
                        return Err(too_large());
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
            Command::GetStatus { instance: None } => (
                StatusCode::OK,
                json!({
                    "instances": self.manager.assigned(),
                    "pools": self.manager.census(),
                }),
            ),
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

fn error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (status, json!({ "error": message }))
}

fn manager_error(e: ManagerError) -> (StatusCode, Value) {
    let status = match &e {
        ManagerError::UnknownPurpose { .. } => StatusCode::BAD_REQUEST,
        ManagerError::Pool(PoolError::Full { .. }) => StatusCode::TOO_MANY_REQUESTS,
        ManagerError::Pool(PoolError::UnknownInstance(_)) => StatusCode::NOT_FOUND,
        ManagerError::Pool(PoolError::UnknownTicket(_)) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::Provider(_) | ManagerError::LaunchFailed(_) | ManagerError::Recovering => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    let message = match &e {
        ManagerError::Pool(PoolError::UnknownInstance(id)) => {
            format!("instance {id} is not in the pool (never was, or already terminated)")
        }
        _ => e.to_string(),
    };
    error(status, &message)
}

#[async_trait]
impl ServeHttp for CommandApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, body) = self.handle(session).await;
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, bytes.len())
            .header(http::header::CACHE_CONTROL, "no-store");
        if status == StatusCode::UNAUTHORIZED {
            response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
        response
            .body(bytes)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
