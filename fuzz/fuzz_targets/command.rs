//! Fuzzes the command API's decoder, `core::command::decode`, with arbitrary bodies. It must
//! never panic; an accepted command is valid JSON, holds a valid user id (non-blank, at most
//! 256 characters, no control characters) or instance id, and decodes to the same command
//! from its canonical JSON; a refusal has a non-empty message under 1 KiB, and `Malformed`
//! is said of exactly the bodies that are not JSON. The checks live in tests/fuzz_corpus.rs,
//! which replays this target's corpus under `cargo test`.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_corpus.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_command(data));
