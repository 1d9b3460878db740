//! Follows a chunked body as it passes, without changing or holding it, and refuses what is
//! not strictly chunked encoding (RFC 9112 §7.1). The edge passes a workspace's chunks on as
//! written, so a client (or a shared intermediary in front of us) reads them exactly as we
//! did only if they leave no room for a second opinion: a chunk-size line is hex digits, then
//! optionally blanks and `;` extensions of visible text, then CRLF; trailers are header
//! lines (`name: value`, CRLF); a bare CR or LF anywhere is an error. Pure, and fuzzed.

/// Trailers longer than this, all lines together, are refused (Pingora caps them too).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body is, between two reads.
#[derive(Debug, Default)]
pub struct Chunks {
    state: State,
    size: u64,
    digits: u8,
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum State {
    /// At the start of a chunk-size line.
    #[default]
    Size,
    /// After at least one digit.
    Digits,
    /// Blanks after the digits: only more blanks, `;` or CR may follow.
    Blank,
    /// A chunk extension, up to its line's end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A byte of a header or trailer name (`tchar`, RFC 9110 §5.6.2).
pub fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte of a field value or extension: visible text, blanks and obs-text; no controls.
fn text_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl Chunks {
    /// Reads the next bytes of the body: `Ok(Some(n))` when it ends after the first `n`
    /// of them, `Ok(None)` when all of them belong to it and it goes on, `Err` when it is
    /// not strict chunked encoding.
    #[allow(clippy::result_unit_err)]
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ()> {
        use State::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Size | Digits => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return Err(());
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(digit);
                        self.digits += 1;
                        self.state = Digits;
                    }
                    b' ' | b'\t' if self.state == Digits => self.state = Blank,
                    b';' if self.state == Digits => self.state = Extension,
                    b'\r' if self.state == Digits => self.state = SizeLf,
                    _ => return Err(()),
                },
                Blank => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Extension,
                    _ => return Err(()),
                },
                Extension => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    } else if !text_byte(b) {
                        return Err(());
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take =
                        (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(());
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Size;
                    self.digits = 0;
                }
                TrailerStart => {
                    if b == b'\r' {
                        self.state = EndLf;
                    } else if token_byte(b) {
                        self.state = TrailerName;
                    } else {
                        return Err(());
                    }
                }
                TrailerName => {
                    if b == b':' {
                        self.state = TrailerValue;
                    } else if !token_byte(b) {
                        return Err(());
                    }
                }
                TrailerValue => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    } else if !text_byte(b) {
                        return Err(());
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                Done => return Ok(Some(i)),
            }
            if matches!(self.state, TrailerName | TrailerValue | TrailerLf | EndLf) {
                self.trailers += 1;
                if self.trailers > MAX_TRAILERS {
                    return Err(());
                }
            }
            i += 1;
        }
        Ok((self.state == Done).then_some(buf.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn scan_all(body: &[u8], split: &[usize]) -> Result<Option<usize>, ()> {
        let mut chunks = Chunks::default();
        let mut start = 0;
        for &at in split.iter().chain([body.len()].iter()) {
            let at = at.clamp(start, body.len());
            if let Some(end) = chunks.scan(&body[start..at])? {
                return Ok(Some(start + end));
            }
            start = at;
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_says() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0 ; last\r\nTrailer: x\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for a in 0..body.len() {
            for b in [a, a + 1, a + 7, body.len()] {
                assert_eq!(scan_all(body, &[a, b]), Ok(Some(end)), "split at {a}, {b}");
            }
        }
        assert_eq!(scan_all(b"0\r\n\r\n", &[]), Ok(Some(5)));
        assert_eq!(scan_all(b"5\r\nhel", &[]), Ok(None));
    }

    #[test]
    fn anything_a_second_reader_could_read_otherwise_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"5\nhello",
            b"fffffffffffffffff\r\n",
            // Junk after the size, with or without a blank.
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"5x\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            // A bare LF or CR inside an extension or a trailer.
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"0\r\nTrailer: x\ny\r\n\r\n",
            b"0\r\nTrailer: x\rz\r\n\r\n",
            b"0\r\nTrailer: x\n\r\n",
            b"0\r\n\n",
            // A trailer that is not a header line.
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: no name\r\n\r\n",
            b"0\r\n Folded: x\r\n\r\n",
        ] {
            assert_eq!(
                scan_all(bad, &[]),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"0\r\nT: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_TRAILERS));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(scan_all(&long, &[]), Err(()));
    }
}
