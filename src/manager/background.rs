//! The pool manager's reconcile loop as a Pingora background service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::PoolManager;

pub struct Reconciler {
    pub manager: Arc<PoolManager>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for Reconciler {
    async fn start(&self, shutdown: ShutdownWatch) {
        Arc::clone(&self.manager).run(self.interval, shutdown).await;
    }
}
