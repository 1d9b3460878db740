//! The pure part of `src/http1/` without the rest of the crate: the answer reader, the chunk
//! follower and the request rules use only `std`, `httparse` and the two limits below, so the
//! `answer` fuzz target compiles them from their own source files and never builds the
//! library (Pingora, the AWS SDK: about 20 minutes instrumented) — only `httparse`.
//!
//! The limits are copies of `src/http1/mod.rs`'s; `tests/fuzz_corpus.rs` includes this file
//! too and asserts that they are equal to the library's, so they cannot drift, and that the
//! three files still compile here, outside the crate.

/// `rstudio_pool::http1::MAX_HEAD`.
pub const MAX_HEAD: usize = 64 * 1024;
/// `rstudio_pool::http1::MAX_HEADERS`.
pub const MAX_HEADERS: usize = 128;

#[path = "../../src/http1/answer.rs"]
pub mod answer;
#[path = "../../src/http1/chunks.rs"]
pub mod chunks;
#[path = "../../src/http1/request.rs"]
pub mod request;
