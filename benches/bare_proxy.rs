//! The baseline of the load benchmark: a bare Pingora `ProxyHttp` that only strips the first
//! path segment and forwards to one upstream. Everything rstudio-pool's proxy does on top of
//! this (routing lookup, rewriting, access check, activity tracking) is what the benchmark
//! prices.
//!
//! `cargo build --release --example bare_proxy`, then
//! `bare_proxy <listen host:port> <upstream ip:port> [threads]`.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _: &mut Session,
        request: &mut RequestHeader,
        _: &mut (),
    ) -> Result<()> {
        let stripped = {
            let path = request.uri.path();
            let rest = path
                .strip_prefix('/')
                .and_then(|p| p.find('/').map(|i| &p[i..]))
                .unwrap_or("/");
            match request.uri.query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            }
        };
        if let Ok(uri) = stripped.parse() {
            request.set_uri(uri);
        }
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare_proxy <listen host:port> <upstream ip:port> [threads]");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("the upstream is ip:port");
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
