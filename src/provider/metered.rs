//! A provider counted: every call in `rstudio_pool_provider_calls_total` and every failure in
//! `rstudio_pool_provider_errors_total`, by operation, whatever the provider underneath.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Consistency, InstanceRecord, LaunchSpec, Provider, ProviderError};
use crate::core::ids::InstanceId;
use crate::metrics::metrics;

pub struct Metered(pub Arc<dyn Provider>);

/// The kind of a failure, as the metrics name it.
pub fn error_kind(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::NotFound(_) => "not_found",
        ProviderError::Unavailable(text) | ProviderError::Other(text) if is_throttling(text) => {
            "throttled"
        }
        ProviderError::Launch { reason, .. } if is_throttling(reason) => "throttled",
        ProviderError::Unavailable(_) | ProviderError::Launch { in_doubt: true, .. } => {
            "unavailable"
        }
        ProviderError::Other(_) | ProviderError::Launch { .. } => "other",
    }
}

/// Whether a provider's words say it throttled us (EC2's `RequestLimitExceeded` and the
/// SDK's throttling errors).
pub fn is_throttling(text: &str) -> bool {
    text.contains("RequestLimitExceeded")
        || text.contains("Throttling")
        || text.to_ascii_lowercase().contains("throttl")
}

fn count<T>(operation: &str, result: Result<T, ProviderError>) -> Result<T, ProviderError> {
    let m = metrics();
    m.provider_calls.with_label_values(&[operation]).inc();
    if let Err(e) = &result {
        m.provider_errors
            .with_label_values(&[operation, error_kind(e)])
            .inc();
    }
    result
}

#[async_trait]
impl Provider for Metered {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn consistency(&self) -> Consistency {
        self.0.consistency()
    }

    fn launch_deadline(&self) -> Duration {
        self.0.launch_deadline()
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        count("launch", self.0.launch(spec).await)
    }

    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        count("list", self.0.list().await)
    }

    async fn lookup(&self, ids: &[InstanceId]) -> Result<Vec<InstanceRecord>, ProviderError> {
        count("lookup", self.0.lookup(ids).await)
    }

    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError> {
        count("set_tags", self.0.set_tags(id, tags).await)
    }

    async fn stop(&self, id: &InstanceId, hibernate: bool) -> Result<(), ProviderError> {
        count("stop", self.0.stop(id, hibernate).await)
    }

    async fn start(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, ProviderError> {
        count("start", self.0.start(id).await)
    }

    async fn diagnose(&self, id: &InstanceId) -> Option<String> {
        self.0.diagnose(id).await
    }

    fn answers(&self, id: &InstanceId) -> Option<bool> {
        self.0.answers(id)
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        count("terminate", self.0.terminate(id).await)
    }
}
