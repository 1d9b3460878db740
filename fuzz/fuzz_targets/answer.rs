//! Fuzzes the hand-written HTTP/1.1 answer side (`src/http1/`) with arbitrary bytes: one knob
//! byte, then bytes read as a workspace's answer head, as a chunked body and as a client's
//! request head. `answer::read` must never panic; an accepted head is written as a strict
//! CRLF head that `httparse`'s default parser reads to its last byte with the same status,
//! reason and headers (a folded value unfolded, no `Content-Length` beside a
//! `Transfer-Encoding`), that reads the same again and is written again unchanged; a refusal
//! or an incomplete head writes nothing. `chunks::Chunks::scan` says the same in one piece,
//! split where the knob says and a byte at a time, and agrees with an independent strict
//! decoder; `request::plain_request` only accepts what it documents, with `body_len` the one
//! `Content-Length`. The checks live in fuzz/checks/answer.rs, which tests/fuzz_corpus.rs
//! replays this target's corpus through under `cargo test`.
//!
//! It does not depend on the library: `fuzz/checks/http1.rs` compiles the three pure files
//! of `src/http1/` on their own, so `cargo fuzz run --no-default-features answer` builds only
//! `httparse` and libFuzzer (see fuzz/README.md).
#![no_main]

#[allow(dead_code)]
#[path = "../checks/http1.rs"]
mod http1;

#[path = "../checks/answer.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_answer(data));
