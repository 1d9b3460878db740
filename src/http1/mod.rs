//! The hand-written HTTP/1.1 path, shared by the edge and the command API. It knows nothing
//! of routing, access or the pool: the connection loop ([`conn`]), what counts as a plain
//! request ([`request`]), how a server's answer is read, framed and written again for the
//! client ([`answer`]), and following a chunked body ([`chunks`]). What it does not take
//! on is Pingora's: a caller hands the request over with [`conn::Connection::through_pingora`].
//!
//! **Invariant:** it is at least as strict as the Pingora path it bypasses. Requests it
//! carries are ones Pingora would read the same way; answers reach the client only in a
//! form that leaves a second reader no other reading (canonical heads, strict chunks, no
//! `Content-Length` beside `Transfer-Encoding`), or not at all (502).

pub mod answer;
pub mod chunks;
pub mod client;
pub mod conn;
pub mod request;

use std::time::Duration;

/// A head longer than this is not read here (a request goes to Pingora, which refuses it;
/// an answer is refused).
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed in a head; a request with more goes to Pingora, an answer is refused.
pub const MAX_HEADERS: usize = 128;
/// How long a kept-alive connection may wait for its next request: Pingora's own default.
pub const KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a kept-alive connection waits before it gives its buffers back.
pub const SHRINK_AFTER: Duration = Duration::from_secs(1);
