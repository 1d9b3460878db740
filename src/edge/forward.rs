//! The edge's own forwarding, for the request nearly every keystroke makes: a plain request
//! to a ready instance whose owner is signed in, with a body of known, small length. The
//! request is decided by [`EdgeProxy::admit`] and rewritten through the same
//! [`super::proxy::Forwarding`] plan as on Pingora's path; [`crate::http1`] carries it on a
//! connection kept for the client's connection and passes the answer back in canonical form
//! (its `Location` and, under a prefix, `Set-Cookie` rewritten by
//! [`EdgeProxy::rewrite_response`]).
//!
//! Anything less plain is never guessed at here: [`plan`] returns `None` and the request goes
//! to Pingora ([`super::Edge`]).

use std::net::{IpAddr, SocketAddr};

use crate::http1::answer::Answer;
use crate::http1::client::ClientStream;
use crate::http1::conn::{Connection, Exchange, Failure, Outcome};
use crate::http1::request::{idempotent, plain_request, PlainRequest};
use crate::metrics::{metrics, ProxyPath};
use crate::provider::process::now_ms;

use super::proxy::{page_html, text, Destination, EdgeProxy, Head, TIMED_OUT, UNREACHABLE};
use super::tunnel::{response_head, write_response_head};

/// The largest request body forwarded here; a larger one streams through Pingora.
const MAX_BODY: usize = 64 * 1024;

/// A request [`plan`] took on.
pub(super) struct Forward {
    head_len: usize,
    body_len: usize,
    /// A `HEAD` request: the answer has no body, whatever its length says.
    head_only: bool,
    /// It may be sent again on a new connection when a kept one fails before any answer.
    retry: bool,
    destination: Destination,
}

/// How a request the edge took on ended.
pub(super) enum Done {
    /// Answered; the connection may carry another request.
    KeepAlive,
    /// Answered or broken off; the connection is finished.
    Close,
    /// Nothing was sent to the workspace: Pingora answers this request.
    Pingora,
}

/// Carries the planned request (`conn.out` holds its rewritten head) to the workspace and
/// its answer back.
pub(super) async fn forward<C: ClientStream>(
    conn: &mut Connection<C>,
    proxy: &EdgeProxy,
    job: Forward,
) -> Done {
    let config = proxy.config();
    let total = job.head_len + job.body_len;
    if !conn.read_to(total, config.downstream_read_timeout).await {
        return Done::Close;
    }
    let Destination::Instance {
        upstream,
        counts,
        prefixed,
        ..
    } = &job.destination
    else {
        return Done::Pingora;
    };
    let Ok(addr) = proxy.address(Some(&job.destination)).await else {
        return Done::Pingora;
    };
    conn.out.extend_from_slice(&conn.input[job.head_len..total]);
    if *counts {
        upstream.touch(now_ms());
    }
    let exchange = Exchange {
        addr,
        connect_timeout: config.upstream_connect_timeout,
        head_only: job.head_only,
        retry: job.retry,
        upgrade: false,
    };
    let outcome = conn
        .exchange(&exchange, |answer, head| {
            rewrite_head(proxy, &job.destination, *prefixed, addr, answer, head)
        })
        .await;
    conn.input.drain(..total);
    count(ProxyPath::Edge, conn.status, &outcome);
    match outcome {
        Outcome::KeepAlive => Done::KeepAlive,
        Outcome::Close | Outcome::Upgraded(_) => Done::Close,
        Outcome::Failed(status, failure) => {
            failed(conn, &upstream.id, status, failure).await;
            Done::Close
        }
    }
}

/// Counts a request the edge took on: the status of the answer that reached the client
/// (`answered`, 0 when none did), or of the page a failure gets.
pub(super) fn count(path: ProxyPath, answered: u16, outcome: &Outcome) {
    let m = metrics();
    match outcome {
        Outcome::Failed(status, failure) => {
            if matches!(failure, Failure::Connect(_) | Failure::ConnectTimeout) {
                m.upstream_connect_errors.inc();
            }
            m.proxied(path, *status);
        }
        _ if answered > 0 => m.proxied(path, answered),
        _ => {}
    }
}

/// Brings the workspace's answer head (with a `Location` or a `Set-Cookie`) back under the
/// instance's prefix: `false` refuses it.
pub(super) fn rewrite_head(
    proxy: &EdgeProxy,
    destination: &Destination,
    prefixed: bool,
    addr: SocketAddr,
    answer: &Answer,
    head: &mut Vec<u8>,
) -> bool {
    if !(answer.location || (prefixed && answer.set_cookie)) {
        return true;
    }
    let Some(Some((mut response, _))) = response_head(head) else {
        return false;
    };
    if proxy
        .rewrite_response(&mut response, Some(destination), Some(addr))
        .is_err()
    {
        return false;
    }
    head.clear();
    write_response_head(&response, head);
    true
}

/// Answers with the proxy's page for a workspace that could not be reached or gave a broken
/// answer (502), or did not take the connection in time (504); the connection closes.
pub(super) async fn failed<C: ClientStream>(
    conn: &mut Connection<C>,
    id: &impl std::fmt::Display,
    status: u16,
    failure: Failure,
) {
    log::info!("{id}: answering {status}: {failure:?}");
    let (title, message) = if status == 504 {
        TIMED_OUT
    } else {
        UNREACHABLE
    };
    let body = page_html(title, message, None);
    conn.send_page(status, "text/html; charset=utf-8", &body)
        .await;
}

/// A request head as the client sent it, for [`EdgeProxy::admit`].
struct RawHead<'h, 'b> {
    method: &'b str,
    target: &'b str,
    headers: &'h [httparse::Header<'b>],
}

impl RawHead<'_, '_> {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

impl Head for RawHead<'_, '_> {
    fn method(&self) -> &str {
        self.method
    }

    fn target(&self) -> &[u8] {
        self.target.as_bytes()
    }

    fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.first(name).and_then(text)
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| text(h.value))
            .find_map(|h| crate::core::access::cookie(h, name))
    }
}

/// Takes the request on when it is plain enough and [`EdgeProxy::admit`] lets it through,
/// writing its head as the workspace gets it into `out`. `None`: Pingora's.
pub(super) fn plan(
    proxy: &EdgeProxy,
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    client_ip: Option<IpAddr>,
    out: &mut Vec<u8>,
) -> Option<Forward> {
    let PlainRequest {
        method,
        target,
        body_len,
        close,
    } = plain_request(req)?;
    // `Connection: close` ends the client's connection too; Pingora does that.
    if close || body_len > MAX_BODY {
        return None;
    }
    let head = RawHead {
        method,
        target,
        headers: req.headers,
    };
    let destination = proxy.admit(&head, client_ip, false)?;
    let Destination::Instance { path, .. } = &destination else {
        return None;
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let plan = proxy.forwarding(
        head.first("host"),
        client_ip,
        Some(&destination),
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .map(|h| h.value),
    );
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for h in req.headers.iter() {
        if plan.drops(h.name) {
            continue;
        }
        if plan.strip_cookie && h.name.eq_ignore_ascii_case("cookie") {
            if let Some(kept) = plan.cookie(h.value) {
                line(h.name.as_bytes(), kept.as_bytes());
            }
            continue;
        }
        line(h.name.as_bytes(), h.value);
    }
    plan.each(|name, value| line(name.as_str().as_bytes(), value));
    out.extend_from_slice(b"\r\n");
    Some(Forward {
        head_len,
        body_len,
        head_only: method == "HEAD",
        retry: idempotent(method),
        destination,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::request::plain_target;

    #[test]
    fn targets_are_split_as_http_uri_splits_them() {
        // The premise of forwarding from our own parse: for every target `plan` accepts,
        // the path and query are what Pingora's parsed URI would give.
        for target in [
            "/i-1/a?b=c",
            "/a?",
            "/a??b",
            "/",
            "/a;b?c=d&e",
            "/%2e%2E/x",
            "/a?b/c?d",
        ] {
            let head = RawHead {
                method: "GET",
                target,
                headers: &[],
            };
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(head.path(), uri.path(), "{target}");
            assert_eq!(head.query(), uri.query(), "{target}");
        }
    }

    proptest::proptest! {
        /// Every target `plan` takes on is one Pingora would have taken too, split the same.
        #[test]
        fn every_target_taken_is_read_as_pingora_reads_it(target in "/[!-~]{0,40}") {
            proptest::prop_assume!(plain_target(&target));
            let uri: http::Uri = target.parse().expect("http::Uri takes it");
            let head = RawHead { method: "GET", target: &target, headers: &[] };
            proptest::prop_assert_eq!(head.path(), uri.path());
            proptest::prop_assert_eq!(head.query(), uri.query());
        }
    }
}
