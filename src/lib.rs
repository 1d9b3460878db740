//! rstudio-pool: a pool of on-demand workspaces (RStudio, JupyterLab, ...) and the edge proxy
//! in front of them, in one Pingora server. ARCHITECTURE.md has the map.

pub mod api;
pub mod audit;
pub mod clock;
pub mod config;
pub mod core;
pub mod demo;
pub mod edge;
pub mod http1;
pub mod manager;
pub mod metrics;
pub mod provider;
pub mod sim;
pub mod tls;
