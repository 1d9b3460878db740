//! The `answer` fuzz target's property checks, written once: `fuzz/fuzz_targets/answer.rs`
//! includes this file as a module beside the `http1` shim (`fuzz/checks/http1.rs`, the three
//! pure files of `src/http1/` compiled on their own), and `tests/fuzz_corpus.rs` includes it
//! beside `rstudio_pool::http1` and replays `fuzz/corpus/answer/` through it under
//! `cargo test`. Whoever includes it must have a module `http1` in the parent module, with
//! `answer`, `chunks`, `request`, `MAX_HEAD` and `MAX_HEADERS`; nothing else is used but
//! `httparse` and `std`.
//!
//! An input is one knob byte, then the bytes: the knob says where the chunk follower's input
//! is split; the bytes are read as a workspace's answer (with and without `head_only`), as a
//! chunked body (from their start, and from the end of the answer head when the answer says
//! chunked) and as a client's request head.

use std::ops::Range;

use super::http1::{answer, chunks, request, MAX_HEAD, MAX_HEADERS};
use answer::{Answer, Framing, Refusal};

/// What the edge writes before an answer head in the same buffer; `read` must append to it
/// and leave it alone.
const KEPT: &[u8] = b"kept: ";

/// Every property of the input.
pub fn check_answer(data: &[u8]) {
    let Some((&knob, bytes)) = data.split_first() else {
        return;
    };
    let last = check_answers(bytes);
    check_chunks(bytes, knob);
    if let Some(body) = last.filter(|(a, _)| a.framing == Framing::Chunked) {
        check_chunks(&bytes[body.1..], knob);
    }
    check_request(bytes);
}

/// The answer heads at the front of `buf`: the first one, and after a complete `1xx` the
/// next (an interim answer is followed by another head), a few deep. The last answer read
/// (without `head_only`) and where its body starts.
fn check_answers(buf: &[u8]) -> Option<(Answer, usize)> {
    let mut start = 0;
    for _ in 0..4 {
        let plain = check_read(&buf[start..], false);
        let head = check_read(&buf[start..], true);
        // `head_only` changes the framing only: the same head, written the same.
        match (&plain, &head) {
            (Ok(Some((p, p_out))), Ok(Some((h, h_out)))) => {
                assert_eq!(p_out, h_out, "head_only changed what is written");
                assert_eq!(
                    (p.head_len, p.status, p.location, p.set_cookie),
                    (h.head_len, h.status, h.location, h.set_cookie)
                );
                assert_eq!(h.framing, Framing::Empty);
                assert!(!p.keep_alive || h.keep_alive, "{p:?} {h:?}");
            }
            // A length that is not one number only matters when a body follows.
            (Err(Refusal::Length), Ok(Some(_))) => {}
            _ => assert_eq!(plain, head),
        }
        let Ok(Some((a, _))) = plain else {
            return None;
        };
        start += a.head_len;
        if !(100..200).contains(&a.status) {
            return Some((a, start));
        }
    }
    None
}

/// Pingora's parser settings for answers, as `answer::read` documents them.
fn lenient() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    config
}

fn named(h: &httparse::Header<'_>, name: &str) -> bool {
    h.name.eq_ignore_ascii_case(name)
}

/// The words of a field value: what is left of it once every line break and run of blanks
/// is taken as one separator.
fn words(value: &[u8]) -> Vec<&[u8]> {
    value
        .split(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// All `Content-Length` values of a head as one: `None` without any, `Some(Err)` unless every
/// comma-separated item is 1 to 19 digits and they all say the same number.
fn one_length(headers: &[httparse::Header<'_>]) -> Option<Result<u64, ()>> {
    let mut items = headers
        .iter()
        .filter(|h| named(h, "content-length"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|item| {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            std::str::from_utf8(item)
                .map_err(drop)?
                .parse::<u64>()
                .map_err(drop)
        })
        .peekable();
    let first = *items.peek()?;
    Some(first.and_then(|first| {
        items.try_fold(first, |n, item| if item? == n { Ok(n) } else { Err(()) })
    }))
}

/// `answer::read` on `buf`, appending to a buffer that already holds something: the answer,
/// and the head the client gets (what it appended, or the head at the front of `buf` when
/// the answer says it is [`Answer::canonical`] already).
fn read(buf: &[u8], head_only: bool) -> Result<Option<(Answer, Vec<u8>)>, Refusal> {
    let mut out = KEPT.to_vec();
    let result = answer::read(buf, head_only, &mut out);
    assert!(out.starts_with(KEPT), "what was in the buffer was changed");
    let written = out.split_off(KEPT.len());
    match result {
        Ok(Some(answer)) if answer.canonical => {
            assert!(written.is_empty(), "canonical, but something was written");
            assert!(answer.head_len <= buf.len());
            let head = buf[..answer.head_len].to_vec();
            Ok(Some((answer, head)))
        }
        Ok(Some(answer)) => Ok(Some((answer, written))),
        Ok(None) | Err(_) => {
            assert!(written.is_empty(), "{result:?}, but something was written");
            result.map(|_| None)
        }
    }
}

/// `answer::read` on `buf`, checked against an independent reading of the same head; the
/// answer and the head the client gets.
#[allow(clippy::type_complexity)]
fn check_read(buf: &[u8], head_only: bool) -> Result<Option<(Answer, Vec<u8>)>, Refusal> {
    let result = read(buf, head_only);
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let parsed = lenient().parse_response(&mut res, buf);
    let (answer, out) = match result {
        Err(refusal) => {
            let expected = match parsed {
                Err(httparse::Error::TooManyHeaders) => Refusal::TooLong,
                Err(_) => Refusal::Malformed,
                Ok(httparse::Status::Partial) => Refusal::TooLong,
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => Refusal::TooLong,
                Ok(httparse::Status::Complete(_)) => Refusal::Length,
            };
            assert_eq!(refusal, expected, "{parsed:?}");
            if refusal == Refusal::TooLong && parsed == Ok(httparse::Status::Partial) {
                assert!(buf.len() >= MAX_HEAD);
            }
            if refusal == Refusal::Length {
                let status = res.code.unwrap_or_default();
                assert!(!head_only && !matches!(status, 100..=199 | 204 | 304));
                assert!(!res.headers.iter().any(|h| named(h, "transfer-encoding")));
                assert_eq!(one_length(res.headers), Some(Err(())));
            }
            return Err(refusal);
        }
        Ok(None) => {
            assert_eq!(parsed, Ok(httparse::Status::Partial));
            assert!(buf.len() < MAX_HEAD);
            return Ok(None);
        }
        Ok(Some(found)) => found,
    };
    assert!(answer.head_len <= buf.len() && answer.head_len <= MAX_HEAD);
    assert_eq!(parsed, Ok(httparse::Status::Complete(answer.head_len)));

    // What the head says, read independently.
    let (status, version) = (res.code.unwrap(), res.version.unwrap());
    assert_eq!(answer.status, status);
    let encoded = res.headers.iter().any(|h| named(h, "transfer-encoding"));
    let lengths = res.headers.iter().any(|h| named(h, "content-length"));
    let last_coding = res
        .headers
        .iter()
        .rev()
        .find(|h| named(h, "transfer-encoding"))
        .map(|h| h.value.rsplit(|&b| b == b',').next().unwrap().trim_ascii());
    let framing = if head_only || matches!(status, 100..=199 | 204 | 304) {
        Framing::Empty
    } else if let Some(coding) = last_coding {
        if coding.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match one_length(res.headers) {
            Some(Ok(n)) => Framing::Length(n),
            Some(Err(())) => panic!("a length that is not one number was accepted"),
            None => Framing::Close,
        }
    };
    assert_eq!(answer.framing, framing);
    let close_token = res.headers.iter().any(|h| {
        named(h, "connection")
            && h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    let keep_alive =
        version == 1 && !close_token && !(encoded && lengths) && framing != Framing::Close;
    assert_eq!(answer.keep_alive, keep_alive);
    assert_eq!(
        answer.location,
        res.headers.iter().any(|h| named(h, "location"))
    );
    assert_eq!(
        answer.set_cookie,
        res.headers.iter().any(|h| named(h, "set-cookie"))
    );

    let blanks = check_written(&out, &res, encoded);
    if !answer.canonical && out[..] == buf[..answer.head_len] {
        // Written exactly as it came: it could have been passed on as it came, unless its
        // reason or a value is empty (the canonical check cannot place those).
        assert!(
            res.reason == Some("") || res.headers.iter().any(|h| h.value.is_empty()),
            "a canonical head was copied: {:?}",
            String::from_utf8_lossy(&out)
        );
    }

    // The body is not read: the head alone gives the same answer.
    assert_eq!(
        read(&buf[..answer.head_len], head_only),
        Ok(Some((answer.clone(), out.clone()))),
        "the bytes after the head changed the head"
    );

    // Idempotent: the head the client gets reads the same, and is passed on unchanged.
    let reread = read(&out, head_only);
    if out.len() > MAX_HEAD {
        // Bare LF heads grow by a byte a line: one near the limit can outgrow it.
        assert_eq!(reread, Err(Refusal::TooLong));
    } else {
        let (second, again) = reread
            .unwrap_or_else(|e| panic!("what was written is refused: {e:?}"))
            .expect("what was written is incomplete");
        assert_eq!(second.head_len, out.len());
        assert_eq!(second.status, answer.status);
        assert_eq!(second.framing, answer.framing);
        assert_eq!(
            (second.location, second.set_cookie),
            (answer.location, answer.set_cookie)
        );
        if answer.keep_alive {
            assert!(second.keep_alive);
        } else if second.keep_alive {
            // Only an HTTP/1.0 answer, or a length dropped beside an encoding, closes the
            // first time and not the second.
            assert!(
                version == 0 || (encoded && lengths),
                "{answer:?} {second:?}"
            );
        }
        assert_eq!(again, out, "writing is not idempotent");
        // It is in canonical form: only an empty reason or value keeps it from passing as it
        // came.
        assert!(
            second.canonical || blanks,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    Ok(Some((answer, out)))
}

/// The head the client gets, `out`, against the head it was read from (`res`); whether its
/// reason or a value is empty.
fn check_written(out: &[u8], res: &httparse::Response<'_, '_>, encoded: bool) -> bool {
    let shown = String::from_utf8_lossy(out);
    // Every line ends in CRLF: no bare CR or LF anywhere.
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in {shown:?}"),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF in {shown:?}"),
            _ => {}
        }
    }
    assert!(out.starts_with(b"HTTP/1.1 "), "{shown:?}");

    // It parses strictly, to its last byte, as the same answer.
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut written = httparse::Response::new(&mut headers);
    assert_eq!(
        written.parse(out),
        Ok(httparse::Status::Complete(out.len())),
        "{shown:?}"
    );
    assert_eq!(written.version, Some(1));
    assert_eq!(written.code, res.code);
    assert_eq!(written.reason, res.reason, "{shown:?}");
    let expected: Vec<_> = res
        .headers
        .iter()
        .filter(|h| !(encoded && named(h, "content-length")))
        .collect();
    assert_eq!(written.headers.len(), expected.len(), "{shown:?}");
    for (w, h) in written.headers.iter().zip(expected) {
        assert_eq!(w.name, h.name, "{shown:?}");
        if h.value.iter().any(|&b| b == b'\r' || b == b'\n') {
            // A folded value, unfolded: the same words, without blanks at either end.
            assert_eq!(words(w.value), words(h.value), "{shown:?}");
            assert_eq!(w.value.trim_ascii(), w.value, "{shown:?}");
        } else {
            assert_eq!(w.value, h.value, "{shown:?}");
        }
    }
    if written
        .headers
        .iter()
        .any(|h| named(h, "transfer-encoding"))
    {
        assert!(
            !written.headers.iter().any(|h| named(h, "content-length")),
            "a length beside an encoding: {shown:?}"
        );
    }
    // Canonical form: the status line and the header lines rebuilt from what was parsed are
    // the same bytes (one blank after the colon, none at the end of a value, no fold).
    let mut rebuilt = format!("HTTP/1.1 {:03} ", written.code.unwrap()).into_bytes();
    rebuilt.extend_from_slice(written.reason.unwrap().as_bytes());
    rebuilt.extend_from_slice(b"\r\n");
    for h in written.headers.iter() {
        rebuilt.extend_from_slice(h.name.as_bytes());
        rebuilt.extend_from_slice(b": ");
        rebuilt.extend_from_slice(h.value);
        rebuilt.extend_from_slice(b"\r\n");
    }
    rebuilt.extend_from_slice(b"\r\n");
    assert_eq!(rebuilt, out, "not in canonical form: {shown:?}");
    written.reason == Some("") || written.headers.iter().any(|h| h.value.is_empty())
}

/// `Chunks::scan` on `body`, in one piece, split where the knob says, and a byte at a time,
/// against [`decode_chunked`].
pub fn check_chunks(body: &[u8], knob: u8) {
    let whole = chunks::Chunks::default().scan(body);
    if let Ok(Some(end)) = whole {
        assert!(end <= body.len());
    }
    let at = body.len() * usize::from(knob) / usize::from(u8::MAX);
    assert_eq!(scan_pieces(body, &[at]), whole, "split at {at}");
    let every: Vec<usize> = (1..body.len()).collect();
    assert_eq!(scan_pieces(body, &every), whole, "a byte at a time");

    let decoded = decode_chunked(body);
    let shown = String::from_utf8_lossy(&body[..body.len().min(300)]);
    match whole {
        Ok(Some(end)) => {
            assert_eq!(decoded.end, Ok(end), "{shown:?}");
            // Unambiguous: outside the chunk data, CR and LF only come as CRLF.
            let mut framing = vec![true; end];
            for range in &decoded.data {
                framing[range.clone()].fill(false);
            }
            for i in (0..end).filter(|&i| framing[i]) {
                match body[i] {
                    b'\r' => assert!(i + 1 < end && framing[i + 1] && body[i + 1] == b'\n'),
                    b'\n' => assert!(i > 0 && framing[i - 1] && body[i - 1] == b'\r'),
                    _ => {}
                }
            }
        }
        Ok(None) => assert_eq!(decoded.end, Err(Stop::Incomplete), "{shown:?}"),
        Err(()) => {
            // Refused: not chunked, or trailers over the limit.
            let over = decoded
                .trailers
                .is_some_and(|start| body.len() - start > chunks::MAX_TRAILERS);
            assert!(
                decoded.end == Err(Stop::Invalid) || over,
                "{:?}: {shown:?}",
                decoded.end
            );
        }
    }
}

/// `Chunks::scan` fed `body` in pieces that end at `splits`: where the body ends, counted
/// from the start of `body`.
fn scan_pieces(body: &[u8], splits: &[usize]) -> Result<Option<usize>, ()> {
    let mut scan = chunks::Chunks::default();
    let mut start = 0;
    for &at in splits.iter().chain([body.len()].iter()) {
        let at = at.clamp(start, body.len());
        if let Some(end) = scan.scan(&body[start..at])? {
            assert!(end <= at - start);
            return Ok(Some(start + end));
        }
        start = at;
    }
    Ok(None)
}

/// Why [`decode_chunked`] stopped short of an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every byte so far fits; more are needed.
    Incomplete,
    /// Not strict chunked encoding.
    Invalid,
}

/// What [`decode_chunked`] found.
#[derive(Debug)]
pub struct Decoded {
    /// Where the body ends.
    pub end: Result<usize, Stop>,
    /// Where the chunk data is.
    pub data: Vec<Range<usize>>,
    /// Where the trailer section starts, once reached.
    pub trailers: Option<usize>,
}

/// A strict reader of RFC 9112 §7.1 chunked bodies, written independently of `Chunks`:
///
/// ```text
/// chunk      = 1*15HEXDIG [ *(SP / HTAB) ";" *text ] CRLF [ data CRLF ]   (data unless 0)
/// trailer    = 1*tchar ":" *text CRLF
/// body       = *chunk trailer* CRLF
/// text       = HTAB / SP / VCHAR / obs-text
/// ```
///
/// (More than 15 digits is refused: a limit, not a rule, as `Chunks` has it.)
pub fn decode_chunked(body: &[u8]) -> Decoded {
    let mut decoded = Decoded {
        end: Err(Stop::Incomplete),
        data: Vec::new(),
        trailers: None,
    };
    let mut r = Reader { b: body, i: 0 };
    decoded.end = r.body(&mut decoded.data, &mut decoded.trailers);
    decoded
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn text(b: u8) -> bool {
    b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80
}

impl Reader<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.b.get(self.i).copied().ok_or(Stop::Incomplete)
    }

    /// Skips the bytes that match; how many.
    fn skip(&mut self, matches: fn(u8) -> bool) -> Result<usize, Stop> {
        let start = self.i;
        while matches(self.peek()?) {
            self.i += 1;
        }
        Ok(self.i - start)
    }

    fn expect(&mut self, byte: u8) -> Result<(), Stop> {
        if self.peek()? != byte {
            return Err(Stop::Invalid);
        }
        self.i += 1;
        Ok(())
    }

    fn crlf(&mut self) -> Result<(), Stop> {
        self.expect(b'\r')?;
        self.expect(b'\n')
    }

    fn body(
        &mut self,
        data: &mut Vec<Range<usize>>,
        trailers: &mut Option<usize>,
    ) -> Result<usize, Stop> {
        loop {
            let mut size = 0u64;
            let mut digits = 0;
            while let Some(digit) = (self.peek()? as char).to_digit(16) {
                if digits == 15 {
                    return Err(Stop::Invalid);
                }
                size = size * 16 + u64::from(digit);
                digits += 1;
                self.i += 1;
            }
            if digits == 0 {
                return Err(Stop::Invalid);
            }
            let blanks = self.skip(|b| b == b' ' || b == b'\t')?;
            if self.peek()? == b';' {
                self.i += 1;
                self.skip(text)?;
            } else if blanks > 0 {
                return Err(Stop::Invalid);
            }
            self.crlf()?;
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).map_err(|_| Stop::Incomplete)?;
            if self.b.len() - self.i < size {
                return Err(Stop::Incomplete);
            }
            data.push(self.i..self.i + size);
            self.i += size;
            self.crlf()?;
        }
        *trailers = Some(self.i);
        loop {
            if self.peek()? == b'\r' {
                self.i += 1;
                self.expect(b'\n')?;
                return Ok(self.i);
            }
            if self.skip(tchar)? == 0 {
                return Err(Stop::Invalid);
            }
            self.expect(b':')?;
            self.skip(text)?;
            self.crlf()?;
        }
    }
}

/// `request::plain_request` on the bytes read as a request head the way the edge and the
/// command API read one: what it accepts is what its documentation promises.
pub fn check_request(bytes: &[u8]) {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(bytes) else {
        return;
    };
    let Some(plain) = request::plain_request(&req) else {
        return;
    };
    assert_eq!(req.version, Some(1));
    assert_eq!(Some(plain.method), req.method);
    assert_eq!(Some(plain.target), req.path);
    assert_ne!(plain.method, "CONNECT");
    assert!(plain.target.starts_with('/'), "{:?}", plain.target);
    assert!(request::plain_target(plain.target));
    let lengths: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| named(h, "content-length"))
        .map(|h| h.value)
        .collect();
    match lengths[..] {
        [] => assert_eq!(plain.body_len, 0),
        [value] => {
            let digits = value.trim_ascii();
            assert!(
                !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
                "{value:?}"
            );
            let n: u128 = std::str::from_utf8(digits).unwrap().parse().unwrap();
            assert_eq!(u128::try_from(plain.body_len).unwrap(), n);
        }
        _ => panic!("accepted {} Content-Length headers", lengths.len()),
    }
    for h in req.headers.iter() {
        for refused in ["transfer-encoding", "expect", "upgrade"] {
            assert!(!named(h, refused), "accepted a {refused}");
        }
    }
    assert!(req.headers.iter().filter(|h| named(h, "host")).count() <= 1);
    let mut close = false;
    for h in req.headers.iter().filter(|h| named(h, "connection")) {
        close |= h.value.eq_ignore_ascii_case(b"close");
        assert!(
            h.value.eq_ignore_ascii_case(b"close") || h.value.eq_ignore_ascii_case(b"keep-alive"),
            "accepted Connection: {:?}",
            String::from_utf8_lossy(h.value)
        );
    }
    assert_eq!(plain.close, close);
}
