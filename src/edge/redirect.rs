//! `proxy.redirect_http`: plain HTTP answered with a redirect to the same host and path over
//! HTTPS (`301` for `GET` and `HEAD`, `308` for the rest, so a method and body are kept), the
//! way a browser that typed the bare name is sent to the TLS proxy. Nothing is proxied here.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request head longer than this is refused.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take over its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Redirects every request to `https://<its host><port><its target>`.
pub struct RedirectToHttps {
    /// `:<port>` of the HTTPS proxy as users reach it, or empty for 443.
    port: String,
}

impl RedirectToHttps {
    /// `public_url` is the proxy's `https://` URL: its port (if any) is where users go.
    pub fn new(public_url: &str) -> Self {
        let authority = public_url
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(public_url)
            .split('/')
            .next()
            .unwrap_or_default();
        let port = match authority.rsplit_once(':') {
            Some((_, port)) if !port.contains(']') && port != "443" => format!(":{port}"),
            _ => String::new(),
        };
        Self { port }
    }

    /// The answer to one request head: status, reason and `Location` (or `None`: 400).
    pub fn answer(&self, head: &[u8]) -> Option<(u16, &'static str, String)> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        let target = req.path?;
        if !target.starts_with('/') {
            return None;
        }
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())?;
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        let bracketed = name.starts_with('[')
            && name.ends_with(']')
            && name[1..name.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if name.is_empty() || !(plain || bracketed) {
            return None;
        }
        let (status, reason) = match req.method? {
            "GET" | "HEAD" => (301, "Moved Permanently"),
            _ => (308, "Permanent Redirect"),
        };
        Some((
            status,
            reason,
            format!("https://{name}{}{target}", self.port),
        ))
    }
}

#[async_trait]
impl ServerApp for RedirectToHttps {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut head = Vec::with_capacity(1024);
        let read = tokio::time::timeout(HEAD_TIMEOUT, async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                if stream.read_buf(&mut head).await.ok()? == 0 {
                    return None;
                }
            }
            Some(())
        })
        .await;
        if !matches!(read, Ok(Some(()))) {
            return None;
        }
        let answer = match self.answer(&head) {
            Some((status, reason, location)) => format!(
                "HTTP/1.1 {status} {reason}\r\nlocation: {location}\r\ncontent-length: 0\r\n\
                 cache-control: no-store\r\nconnection: close\r\n\r\n"
            ),
            None => "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
                     content-length: 45\r\nconnection: close\r\n\r\n\
                     Use https:// with a host name this proxy has.\n"
                .to_owned(),
        };
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.flush().await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_same_host_and_target_over_https() {
        let on_443 = RedirectToHttps::new("https://rstudio.example.com");
        let on_8443 = RedirectToHttps::new("https://rstudio.example.com:8443/");
        let get = b"GET /i-0123456789abcdef0/?x=1 HTTP/1.1\r\nHost: ws.example.com\r\n\r\n";
        assert_eq!(
            on_443.answer(get).unwrap(),
            (
                301,
                "Moved Permanently",
                "https://ws.example.com/i-0123456789abcdef0/?x=1".into()
            )
        );
        assert_eq!(
            on_8443.answer(get).unwrap().2,
            "https://ws.example.com:8443/i-0123456789abcdef0/?x=1"
        );
        let post = b"POST /a HTTP/1.1\r\nHost: ws.example.com:80\r\n\r\n";
        assert_eq!(on_443.answer(post).unwrap().0, 308);
        assert_eq!(on_443.answer(post).unwrap().2, "https://ws.example.com/a");
        let v6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(on_443.answer(v6).unwrap().2, "https://[::1]/");
    }

    #[test]
    fn hosts_and_targets_that_could_lead_elsewhere_are_refused() {
        let r = RedirectToHttps::new("https://rstudio.example.com");
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: evil.com/x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a@evil.com\r\n\r\n",
            b"GET http://evil.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n",
            b"GET //evil.com HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.com",
        ] {
            assert!(
                r.answer(head).is_none(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
