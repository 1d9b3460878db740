//! rstudio-pool: a pool of on-demand workspaces (RStudio, JupyterLab, ...) and the edge proxy
//! in front of them, in one Pingora server. ARCHITECTURE.md has the map.

pub mod config;
pub mod core;
pub mod demo;
pub mod provider;
pub mod service;
