//! The pure core: the pool's state and decisions, identifiers, the command decoder, route
//! parsing and rewriting, credential checks.
//!
//! **Architecture invariant:** nothing here does I/O, reads a clock, or knows Pingora, AWS or
//! tokio. Time comes in as milliseconds; decisions go out as plain values.

pub mod access;
pub mod auth;
pub mod breaker;
pub mod bucket;
pub mod command;
pub mod ids;
pub mod ledger;
pub mod pool;
pub mod presence;
pub mod redact;
pub mod route;
pub mod token;
pub mod warm;
pub mod wsframe;
