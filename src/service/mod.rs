//! Services: the pool manager and the Pingora services around it (command API, reconcile
//! loop, edge proxy with its own forwarding and WebSocket tunnel).
//!
//! **Architecture invariant:** only `proxy` knows Pingora's proxy phases; `edge`, `forward`
//! and `tunnel` are the only other code that reads or writes HTTP on the edge listener, and
//! they decide and rewrite only through `proxy`'s methods; `manager` knows no Pingora type at
//! all, so it can be driven directly by tests.

pub mod api;
pub mod background;
pub mod edge;
pub mod forward;
pub mod links;
pub mod manager;
pub mod probe;
pub mod proxy;
pub mod tunnel;
