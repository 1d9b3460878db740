//! Follows the frames a WebSocket client sends (RFC 6455 §5.2) without holding them, to tell
//! a user's messages from the socket's own upkeep: a data frame (text, binary, or a
//! continuation of either) is the user's; ping, pong and close are not. A browser answers the
//! workspace's pings by itself for as long as a tab is open, so counting every byte would
//! keep an abandoned tab's workspace alive forever.
//!
//! Only frame heads are looked at: a payload is skipped by its length however many reads it
//! spans, and a head split between reads is kept (at most 14 bytes) until it is whole. Pure:
//! bytes in, a verdict out.

/// The longest frame head: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEAD: usize = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame head; `have` bytes of it are in `head`.
    Head { have: u8 },
    /// Skipping this many payload bytes.
    Payload { left: u64 },
}

/// The state of one client-to-workspace stream: 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameScanner {
    state: State,
    head: [u8; MAX_HEAD],
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self {
            state: State::Head { have: 0 },
            head: [0; MAX_HEAD],
        }
    }
}

/// The head's length once its first two bytes are known.
fn head_len(b1: u8) -> usize {
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let length = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + length + mask
}

fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
        n => u64::from(n),
    }
}

/// Whether a frame with this opcode carries the user's data.
fn is_data(opcode: u8) -> bool {
    matches!(opcode, 0x0..=0x2)
}

impl FrameScanner {
    /// Takes in the next bytes the client sent; true when a data frame began in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut data = false;
        while !bytes.is_empty() {
            match self.state {
                State::Payload { left } => {
                    let skip = left.min(bytes.len() as u64);
                    bytes = &bytes[skip as usize..];
                    self.state = if left == skip {
                        State::Head { have: 0 }
                    } else {
                        State::Payload { left: left - skip }
                    };
                }
                State::Head { have } => {
                    let mut have = usize::from(have);
                    // The first two bytes say how long the head is.
                    let need = if have < 2 { 2 } else { head_len(self.head[1]) };
                    let take = (need - have).min(bytes.len());
                    self.head[have..have + take].copy_from_slice(&bytes[..take]);
                    have += take;
                    bytes = &bytes[take..];
                    if have < need {
                        self.state = State::Head { have: have as u8 };
                    } else if have == 2 && head_len(self.head[1]) > 2 {
                        self.state = State::Head { have: 2 };
                    } else {
                        data |= is_data(self.head[0] & 0x0f);
                        let left = payload_len(&self.head[..have]);
                        self.state = if left == 0 {
                            State::Head { have: 0 }
                        } else {
                            State::Payload { left }
                        };
                    }
                }
            }
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame, as a browser sends it.
    fn frame(opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload_len {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        // Payload bytes that look like frame heads, to catch a scanner that loses its place.
        out.extend((0..payload_len).map(|i| if i % 2 == 0 { 0x81 } else { 0x89 }));
        out
    }

    #[test]
    fn data_frames_count_and_control_frames_do_not() {
        for (opcode, counts) in [
            (0x1, true),
            (0x2, true),
            (0x0, true),
            (0x8, false),
            (0x9, false),
            (0xA, false),
        ] {
            let mut s = FrameScanner::default();
            assert_eq!(s.feed(&frame(opcode, 5)), counts, "opcode {opcode:#x}");
        }
        let mut s = FrameScanner::default();
        let mut pings = frame(0x9, 0);
        pings.extend(frame(0xA, 125));
        pings.extend(frame(0x9, 70_000));
        assert!(!s.feed(&pings));
        assert!(
            s.feed(&frame(0x1, 0)),
            "an empty text message is still a message"
        );
    }

    #[test]
    fn a_head_split_across_reads_is_put_together() {
        let bytes = frame(0x2, 300);
        let mut s = FrameScanner::default();
        // 2 bytes, a 2-byte length, a 4-byte mask.
        assert!(!s.feed(&bytes[..1]));
        assert!(!s.feed(&bytes[1..3]));
        assert!(!s.feed(&bytes[3..7]));
        assert!(
            s.feed(&bytes[7..9]),
            "the head is whole once the mask is in"
        );
        assert!(!s.feed(&bytes[9..200]));
        assert!(!s.feed(&bytes[200..]));
        // And the next frame is read from its first byte.
        assert!(!s.feed(&frame(0xA, 3)));
    }

    proptest! {
        /// However a stream of frames is cut into reads, the scanner finds the same data
        /// frames as a reader of whole frames, and ends at a frame boundary.
        #[test]
        fn any_cut_of_a_stream_gives_the_same_verdicts(
            frames in proptest::collection::vec((prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)], 0usize..70_000), 1..12),
            cuts in proptest::collection::vec(1usize..5000, 1..40),
        ) {
            let mut stream = Vec::new();
            let mut data_ends = Vec::new();
            for (opcode, len) in &frames {
                let f = frame(*opcode, *len);
                // Where the head of a data frame is complete.
                if is_data(*opcode) {
                    data_ends.push(stream.len() + f.len() - len);
                }
                stream.extend(f);
            }
            let mut s = FrameScanner::default();
            let mut at = 0;
            let mut seen = Vec::new();
            let mut cut = cuts.iter().cycle();
            while at < stream.len() {
                let end = (at + cut.next().unwrap()).min(stream.len());
                if s.feed(&stream[at..end]) {
                    seen.push(end);
                }
                // Each read that completes a data frame's head says so.
                let expected = data_ends.iter().any(|&e| e > at && e <= end);
                prop_assert_eq!(seen.last() == Some(&end), expected, "read {}..{}", at, end);
                at = end;
            }
            prop_assert_eq!(s, FrameScanner { head: s.head, ..FrameScanner::default() });
        }
    }
}
