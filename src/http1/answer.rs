//! A workspace's answer head, read with Pingora's own parser settings and written again in
//! one canonical form before any of it reaches the client. Whatever the workspace wrote
//! (bare LF line ends, folded lines, blanks before a colon, `Content-Length` beside
//! `Transfer-Encoding`), the client and any intermediary in front of us read one answer,
//! framed as we framed it. Pure, and fuzzed (`fuzz/fuzz_targets/answer.rs`).
//!
//! The rules are Pingora's where it has one (`pingora-core` 0.9, `v1::client` and
//! `v1::common`): the same `httparse` settings, `Content-Length` reconciled as
//! `content_length_parse_all` does (identical duplicates or lists are one value, anything
//! else is an error), and chunked when the last coding of the last `Transfer-Encoding` is
//! `chunked`. Where Pingora is looser than RFC 9112 we follow the RFC: a `Content-Length`
//! beside a `Transfer-Encoding` is dropped (§6.3: a proxy must not forward it) and the
//! workspace's connection is not kept, and an encoding that is not chunked at the end is
//! read to the close.

use std::mem::MaybeUninit;

use super::MAX_HEADERS;

/// How the workspace's answer body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// An answer head as [`read`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Its length in the workspace's bytes.
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// Whether the workspace's connection may carry another request after this answer.
    pub keep_alive: bool,
    /// It has a `Location`.
    pub location: bool,
    /// It has a `Set-Cookie`.
    pub set_cookie: bool,
    /// The head at the front of the buffer is already as the client gets it, and nothing
    /// was written: it is passed on as it came.
    pub canonical: bool,
}

/// Why an answer head was refused; the edge answers 502 (or closes, mid-answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not an HTTP/1 answer head.
    Malformed,
    /// A `Content-Length` that is not one number.
    Length,
    /// A head longer than the edge reads.
    TooLong,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Malformed => "the workspace's answer is not HTTP/1",
            Refusal::Length => "the workspace's answer has a Content-Length that is not one number",
            Refusal::TooLong => "the workspace's answer head is too long",
        })
    }
}

/// Pingora's parser settings for answers (`parse_resp_buffer`).
fn parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    config
}

/// Reads the answer head at the front of `buf` and, unless it is [`Answer::canonical`]
/// already, appends it to `out` as the client gets it: `HTTP/1.1`, the status and reason,
/// each header as `name: value` with CRLF (a folded value unfolded, a `Content-Length`
/// beside an encoding left out). `Ok(None)` while the head is incomplete (nothing written).
/// `head_only`: the answer to a `HEAD`, with no body.
pub fn read(buf: &[u8], head_only: bool, out: &mut Vec<u8>) -> Result<Option<Answer>, Refusal> {
    // Strictly first: a head that needs none of Pingora's leniencies (folded lines, blanks
    // before a colon) has values without line breaks, which the canonical check relies on.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    );
    match parsed {
        Ok(status) => finish(buf, status, res, true, head_only, out),
        Err(httparse::Error::TooManyHeaders) => Err(Refusal::TooLong),
        Err(_) => {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut []);
            match parser().parse_response_with_uninit_headers(&mut res, buf, &mut headers) {
                Ok(status) => finish(buf, status, res, false, head_only, out),
                Err(httparse::Error::TooManyHeaders) => Err(Refusal::TooLong),
                Err(_) => Err(Refusal::Malformed),
            }
        }
    }
}

/// The rest of [`read`], on a head `httparse` read (`strict`: with its default settings).
fn finish(
    buf: &[u8],
    parsed: httparse::Status<usize>,
    res: httparse::Response<'_, '_>,
    strict: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, Refusal> {
    let head_len = match parsed {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= super::MAX_HEAD => return Err(Refusal::TooLong),
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > super::MAX_HEAD {
        return Err(Refusal::TooLong);
    }
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Err(Refusal::Malformed);
    };
    let (mut length, mut lengths, mut last_coding) = (None::<u64>, false, None::<&[u8]>);
    let (mut close, mut location, mut set_cookie) = (version != 1, false, false);
    for h in res.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            lengths = true;
            // Reconciled later: only when no encoding makes it moot.
            if length.is_none() {
                if let Some(n) = digits(h.value) {
                    // The common case: one header, one number.
                    length = Some(n);
                    continue;
                }
            }
            for item in h.value.split(|&b| b == b',') {
                match (digits(item.trim_ascii()), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(seen)) if n == seen => {}
                    _ => length = Some(u64::MAX),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            last_coding = Some(
                h.value
                    .rsplit(|&b| b == b',')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii(),
            );
        } else if name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("location") {
            location = true;
        } else if name.eq_ignore_ascii_case("set-cookie") {
            set_cookie = true;
        }
    }
    let encoded = last_coding.is_some();
    let framing = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if let Some(coding) = last_coding {
        if coding.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(u64::MAX) => return Err(Refusal::Length),
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    // A length beside an encoding: dropped, and that connection not kept (RFC 9112 §6.3).
    close |= encoded && lengths;
    let drop_lengths = encoded && lengths;
    let keep_alive = !close && framing != Framing::Close;
    let answer = Answer {
        head_len,
        status,
        framing,
        keep_alive,
        location,
        set_cookie,
        canonical: strict && !drop_lengths && canonical(buf, head_len, &res),
    };
    if answer.canonical {
        return Ok(Some(answer));
    }
    out.reserve(head_len + 16);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        if drop_lengths && h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        if h.value.iter().any(|&b| b == b'\r' || b == b'\n') {
            // An obsolete fold: each line break and the blanks around it become one space
            // (RFC 9112 §5.2).
            let mut blank = false;
            for &b in h.value.trim_ascii() {
                if matches!(b, b'\r' | b'\n' | b' ' | b'\t') {
                    blank = true;
                } else {
                    if blank {
                        out.push(b' ');
                        blank = false;
                    }
                    out.push(b);
                }
            }
        } else {
            out.extend_from_slice(h.value);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(answer))
}

/// Whether the head at the front of `buf` is byte for byte what [`read`] would write: the
/// status line `HTTP/1.1 SSS reason`, then each header as `name: value` (a value of its own
/// without line breaks: `res` was read strictly), all lines ended by CRLF and nothing between
/// them. Found from where `httparse` placed each part, a few comparisons a header, so that
/// the common answer is passed on as it came instead of being copied.
fn canonical(buf: &[u8], head_len: usize, res: &httparse::Response<'_, '_>) -> bool {
    let base = buf.as_ptr() as usize;
    let offset = |part: &[u8]| (part.as_ptr() as usize).wrapping_sub(base);
    let crlf = |at: usize| buf.get(at..at + 2) == Some(b"\r\n");
    let Some(reason) = res.reason.filter(|r| !r.is_empty()) else {
        return false;
    };
    if !buf.starts_with(b"HTTP/1.1 ")
        || buf.get(12) != Some(&b' ')
        || offset(reason.as_bytes()) != 13
    {
        return false;
    }
    let mut at = 13 + reason.len();
    if !crlf(at) {
        return false;
    }
    at += 2;
    for h in res.headers.iter() {
        if h.value.is_empty() || offset(h.name.as_bytes()) != at {
            return false;
        }
        at += h.name.len();
        if buf.get(at..at + 2) != Some(b": ") || offset(h.value) != at + 2 {
            return false;
        }
        at += 2 + h.value.len();
        if !crlf(at) {
            return false;
        }
        at += 2;
    }
    crlf(at) && at + 2 == head_len
}

/// A `Content-Length` item: digits only, as Pingora's `from_digits`.
pub(super) fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d - b'0'))
            .filter(|&n| n < u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(head: &str) -> (Answer, String) {
        let mut out = Vec::new();
        let answer = read(head.as_bytes(), false, &mut out).unwrap().unwrap();
        if answer.canonical {
            assert!(out.is_empty());
            out.extend_from_slice(&head.as_bytes()[..answer.head_len]);
        }
        (answer, String::from_utf8(out).unwrap())
    }

    #[test]
    fn only_heads_written_as_we_would_write_them_pass_as_they_came() {
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nA: 1\r\nB: two words\r\n\r\n",
        ] {
            assert!(norm(head).0.canonical, "{head:?}");
        }
        for head in [
            "HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 12\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 12\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length:12\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length :12\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length:  12\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 12 \r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX:\r\n\r\n",
            "HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (answer, out) = norm(head);
            assert!(!answer.canonical, "{head:?}");
            // What is written instead passes as it comes when read again.
            assert!(
                norm(&out).0.canonical || out.contains(" \r\n") || out.contains(": \r\n"),
                "{out:?}"
            );
        }
    }

    #[test]
    fn answer_heads_say_how_they_end() {
        let (a, out) = norm("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Length(12), true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        let (a, _) = norm("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Chunked, true));
        let (a, out) =
            norm("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Chunked, false));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        // Even a length that is not a number is moot beside an encoding, and dropped.
        let (a, out) =
            norm("HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(a.framing, Framing::Chunked);
        assert!(!out.to_ascii_lowercase().contains("content-length"));
        let (a, _) = norm("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Close, false));
        let (a, _) = norm("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Close, false));
        let (a, _) = norm("HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Empty, true));
        let (a, out) = norm("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert_eq!((a.framing, a.keep_alive), (Framing::Length(1), false));
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"));
        let (a, _) =
            norm("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!a.keep_alive);
        // Identical duplicates are one length, as Pingora reconciles them.
        let (a, _) = norm("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(a.framing, Framing::Length(4));
        let (a, _) = norm("HTTP/1.1 302 Found\r\nLocation: /x\r\nSet-Cookie: a=b\r\n\r\n");
        assert!(a.location && a.set_cookie);
        let mut out = Vec::new();
        let a = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            true,
            &mut out,
        );
        assert_eq!(a.unwrap().unwrap().framing, Framing::Empty);
    }

    #[test]
    fn loose_heads_are_written_canonically() {
        // Bare LF line ends, a blank before the colon, a folded value.
        let (a, out) = norm("HTTP/1.1 200 OK\nContent-Length: 2\nX-A : 1\nX-B: a\r\n  b\n\n");
        assert_eq!(a.framing, Framing::Length(2));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-B: a b\r\n\r\n"
        );
        let (_, out) = norm("HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n");
        assert_eq!(out, "HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn ambiguous_or_broken_heads_are_refused() {
        let mut out = Vec::new();
        for (head, refusal) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
                Refusal::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                Refusal::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                Refusal::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0x1\r\n\r\n",
                Refusal::Length,
            ),
            (b"SSH-2.0\r\n\r\n", Refusal::Malformed),
            (b"HTTP/1.1 200 OK\r\nA\0: b\r\n\r\n", Refusal::Malformed),
        ] {
            assert_eq!(read(head, false, &mut out), Err(refusal), "{head:?}");
            assert!(out.is_empty());
        }
        assert_eq!(
            read(b"HTTP/1.1 200 OK\r\nContent-", false, &mut out),
            Ok(None)
        );
        assert!(out.is_empty());
    }
}
