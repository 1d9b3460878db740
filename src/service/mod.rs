//! Services: the pool manager and the Pingora services around it (command API, reconcile
//! loop, edge proxy).
//!
//! **Architecture invariant:** only `proxy` knows Pingora's proxy phases; `manager` knows no
//! Pingora type at all, so it can be driven directly by tests.

pub mod api;
pub mod background;
pub mod links;
pub mod manager;
pub mod probe;
pub mod proxy;
