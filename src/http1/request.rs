//! What counts as a plain request: one the edge and the command API may carry themselves
//! because Pingora would read it the same way. Pure: no I/O, fuzzed with the answer side.

/// A request head plain enough to carry without Pingora, as [`plain_request`] read it.
pub struct PlainRequest<'b> {
    pub method: &'b str,
    pub target: &'b str,
    pub body_len: usize,
    /// The client sent `Connection: close`.
    pub close: bool,
}

/// The edge and the command API carry a request themselves only when it is HTTP/1.1 with an
/// origin-form target Pingora reads the same way, a body of one valid `Content-Length` (or
/// none), one `Host` at most, no `Transfer-Encoding`, `Expect` or `Upgrade`, and `Connection`
/// absent, `keep-alive` or `close`. `None`: Pingora's.
pub fn plain_request<'b>(req: &httparse::Request<'_, 'b>) -> Option<PlainRequest<'b>> {
    let (Some(method), Some(1), Some(target)) = (req.method, req.version, req.path) else {
        return None;
    };
    if method == "CONNECT" || !plain_target(target) {
        return None;
    }
    let (mut body_len, mut hosts, mut close) = (None, 0, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if body_len.is_some() {
                return None;
            }
            body_len = Some(length(h.value)?);
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        }
    }
    (hosts <= 1).then_some(PlainRequest {
        method,
        target,
        body_len: body_len.unwrap_or(0),
        close,
    })
}

/// An origin-form target that `http::Uri` (and so Pingora) reads as we split it: visible
/// ASCII without a fragment or the characters it refuses.
pub fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'#' | b'<' | b'>' | b'`' | b'"'))
}

/// A request's `Content-Length` value: digits only, blanks around them allowed.
pub fn length(value: &[u8]) -> Option<usize> {
    super::answer::digits(value.trim_ascii()).and_then(|n| usize::try_from(n).ok())
}

/// Whether a request header is passed on under this name. A name with `_` is not, on either
/// path, as nginx does by default: servers that read headers CGI-style (Rook, PHP, WSGI)
/// take `X_Forwarded_For` for the `X-Forwarded-For` we set.
pub fn passable_name(name: &str) -> bool {
    // A plain loop: names are short, and `contains` calls out to memchr for each.
    name.bytes().all(|b| b != b'_')
}

/// Whether a request may be sent again after its connection failed without an answer
/// (RFC 9110 §9.2.2): only methods the client itself may repeat without asking the user.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(length(b"0"), Some(0));
        assert_eq!(length(b" 42 "), Some(42));
        for bad in [&b""[..], b"+1", b"1,1", b"0x10", b"99999999999999999999"] {
            assert_eq!(length(bad), None);
        }
    }

    #[test]
    fn underscores_and_retries() {
        assert!(passable_name("X-Forwarded-For"));
        assert!(!passable_name("X_Forwarded_For"));
        assert!(idempotent("GET") && idempotent("PUT"));
        assert!(!idempotent("POST") && !idempotent("PATCH") && !idempotent("get"));
    }
}
