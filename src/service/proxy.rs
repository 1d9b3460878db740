//! The edge proxy: `/i-<instanceId>/...` to the owner's workspace.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};

use super::manager::PoolManager;
use crate::core::ids::InstanceId;

pub struct EdgeProxy {
    pub manager: Arc<PoolManager>,
}

#[derive(Default)]
pub struct RequestCtx {
    upstream_path: Option<String>,
    address: Option<std::net::SocketAddr>,
}

async fn respond(session: &mut Session, status: u16, body: &'static str) -> Result<bool> {
    let mut header = ResponseHeader::build(status, Some(2))?;
    header.insert_header("content-type", "text/plain; charset=utf-8")?;
    header.insert_header("content-length", body.len().to_string())?;
    session.write_response_header(Box::new(header), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await?;
    Ok(true)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let path = session.req_header().uri.path().to_owned();
        let rest = path.strip_prefix('/').unwrap_or(&path);
        let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(id) = InstanceId::parse(id) else {
            return respond(session, 404, "not found\n").await;
        };
        let Some(route) = self.manager.route(&id) else {
            return respond(session, 404, "no such workspace\n").await;
        };
        let Some(address) = route.address.and_then(|a| a.parse().ok()) else {
            return respond(session, 503, "the workspace is starting\n").await;
        };
        ctx.address = Some(address);
        let query = session
            .req_header()
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        ctx.upstream_path = Some(format!("/{tail}{query}"));
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let address = ctx
            .address
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        Ok(Box::new(HttpPeer::new(address, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(path) = ctx.upstream_path.take() {
            upstream_request.set_uri(path.parse().map_err(|_| {
                Error::explain(ErrorType::InvalidHTTPHeader, "bad upstream path")
            })?);
        }
        Ok(())
    }
}
