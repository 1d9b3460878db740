//! Providers: where instances really live. A provider can launch, list, tag and terminate
//! instances and knows their addresses; the pool manager decides, the provider carries out.
//!
//! **Architecture invariant:** the provider is the source of truth (I5). Everything the pool
//! knows about an instance, its purpose and its owner included, can be rebuilt from
//! [`Provider::list`], so the process may die at any moment without losing a user's instance.

pub mod ec2;
pub mod process;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::core::ids::{InstanceId, UserId};

/// Tag naming the purpose of an instance (`rstudio`, `jupyter`, ...).
pub const TAG_PURPOSE: &str = "Purpose";
/// Tag naming the user an instance is assigned to, set once and never changed.
pub const TAG_USER: &str = "userId";
/// Tag naming the pool an instance belongs to, so that pools sharing an account keep apart.
pub const TAG_POOL: &str = "rstudio-pool";
/// The human-readable name of an instance.
pub const TAG_NAME: &str = "Name";
/// When the instance was assigned to its user, in milliseconds since the Unix epoch.
pub const TAG_ASSIGNED_AT: &str = "assignedAt";
/// The user's last activity seen by the proxy (ms since the epoch), saved now and then so
/// that idle deadlines survive a restart.
pub const TAG_LAST_ACTIVITY: &str = "lastActivity";

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub purpose: String,
    /// Tags beyond those every instance gets (purpose, pool, name): the owner's, when the
    /// launch is for a user who asked and found no free instance.
    pub tags: Vec<(String, String)>,
}

/// The provider's view of an instance's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderState {
    Pending,
    Running,
    /// Any state from which the instance will not serve again (stopping, stopped, ...).
    Stopped,
}

/// One instance as the provider reports it.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub state: ProviderState,
    pub tags: BTreeMap<String, String>,
    /// `host:port` the proxy connects to, once known.
    pub address: Option<String>,
    /// When the instance was launched, in milliseconds since the Unix epoch.
    pub launched_at_ms: u64,
    /// The SSH key pair of an EC2 instance; none for local processes.
    pub key_name: Option<String>,
}

impl InstanceRecord {
    /// A tag holding milliseconds since the epoch; absent or unreadable is `None`.
    pub fn time_tag(&self, key: &str) -> Option<u64> {
        self.tags.get(key).and_then(|v| v.parse().ok())
    }

    pub fn purpose(&self) -> Option<&str> {
        self.tags.get(TAG_PURPOSE).map(String::as_str)
    }

    /// The owner recorded in the tags. A tag that is not a valid user id counts as no owner
    /// being readable, which the pool treats as an instance it cannot safely hand out.
    pub fn owner(&self) -> Result<Option<UserId>, String> {
        match self.tags.get(TAG_USER) {
            None => Ok(None),
            Some(text) => UserId::parse(text)
                .map(Some)
                .map_err(|e| format!("tag {TAG_USER} of {}: {e}", self.id)),
        }
    }
}

/// Why a provider call failed, in words that say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("could not launch a {purpose} instance: {reason}")]
    Launch { purpose: String, reason: String },
    #[error("instance {0} does not exist at the provider")]
    NotFound(InstanceId),
    #[error("the provider failed: {0}")]
    Other(String),
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// A short name for logs (`process`, `ec2`).
    fn kind(&self) -> &'static str;

    /// Starts an instance tagged with its purpose, the pool and (if given) its owner. The tags
    /// exist from the first moment, so a crash right after leaves a findable instance.
    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError>;

    /// Every live instance of this pool (not terminated), with its tags.
    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError>;

    /// Adds or replaces tags of an instance (its owner, its last activity).
    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError>;

    /// Stops an instance for good. Terminating an instance that is already gone succeeds.
    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError>;
}
