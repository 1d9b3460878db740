//! Providers: where instances really live. A provider can launch, list, tag and terminate
//! instances and knows their addresses; the pool manager decides, the provider carries out.
//!
//! **Architecture invariant:** the provider is the source of truth (I5). Everything the pool
//! knows about an instance, its purpose and its owner included, can be rebuilt from
//! [`Provider::list`], so the process may die at any moment without losing a user's instance.

pub mod ec2;
pub mod metered;
pub mod process;

use std::collections::BTreeMap;
use std::time::Duration;

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
/// When the instance was paused (stopped with its owner's work kept), ms since the epoch.
pub const TAG_STOPPED_AT: &str = "stoppedAt";
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
    /// Names this launch at the provider: every retry of it makes at most one instance (EC2's
    /// `ClientToken`), and the instance carries it, so that a launch whose answer was lost is
    /// recognised when its instance is listed. At most 64 ASCII characters.
    pub client_token: String,
}

/// The provider's view of an instance's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderState {
    Pending,
    Running,
    /// Any state from which the instance will not serve again (stopping, stopped, ...).
    Stopped,
    /// Terminated or shutting down: only a lookup by id reports these.
    Terminated,
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
    /// The client token of the launch that made it, when the provider keeps it.
    pub client_token: Option<String>,
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

/// How far a provider's listings may be behind its launches and terminations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consistency {
    /// An instance launched this long ago is listed (and can be tagged and terminated).
    pub listing_lag: Duration,
    /// A known instance missing from listings this long, and not confirmed gone by a lookup,
    /// is gone. Zero: a listing that misses an instance is the truth.
    pub missing_grace: Duration,
}

/// Why a provider call failed, in words that say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The launch failed. `in_doubt`: its answer was lost (a timeout, a dropped connection, a
    /// server error), so an instance may exist all the same.
    #[error("could not launch a {purpose} instance: {reason}")]
    Launch {
        purpose: String,
        reason: String,
        in_doubt: bool,
    },
    /// The provider does not know the instance. On a provider whose listings lag this is not
    /// proof that it is gone: EC2 says so of an instance launched seconds ago.
    #[error("instance {0} does not exist at the provider")]
    NotFound(InstanceId),
    /// Throttled, a server error, a timeout or a dropped connection: worth trying again.
    #[error("the provider is unavailable for now: {0}")]
    Unavailable(String),
    #[error("the provider failed: {0}")]
    Other(String),
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// A short name for logs (`process`, `ec2`).
    fn kind(&self) -> &'static str;

    /// How far the provider's listings may be behind the truth: zero for one whose listings
    /// are always current.
    fn consistency(&self) -> Consistency {
        Consistency::default()
    }

    /// The longest a launch call may take, retries included: an instance this much younger
    /// than a launch's answer may still belong to it.
    fn launch_deadline(&self) -> Duration;

    /// Starts an instance tagged with its purpose, the pool and (if given) its owner. The tags
    /// exist from the first moment, so a crash right after leaves a findable instance.
    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError>;

    /// Every live instance of this pool (not terminated), with its tags.
    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError>;

    /// These instances of this pool as the provider knows them, terminated ones included
    /// ([`ProviderState::Terminated`]); an instance it does not know is left out. A provider
    /// whose listings never lag needs no lookup: the default finds nothing.
    async fn lookup(&self, ids: &[InstanceId]) -> Result<Vec<InstanceRecord>, ProviderError> {
        let _ = ids;
        Ok(Vec::new())
    }

    /// Adds or replaces tags of an instance (its owner, its last activity).
    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError>;

    /// Stops an instance and keeps it (its disk, and with `hibernate` its memory) to be
    /// started again. Stopping one that is stopped already succeeds.
    async fn stop(&self, id: &InstanceId, hibernate: bool) -> Result<(), ProviderError>;

    /// Starts a stopped instance again. Its address may change: the record, when the
    /// provider has it at once.
    async fn start(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, ProviderError>;

    /// Why an instance that failed to start failed, in words its user may read: how its
    /// process ended and the last lines of its log, with credentials taken out. `None` when
    /// the provider cannot tell.
    async fn diagnose(&self, id: &InstanceId) -> Option<String> {
        let _ = id;
        None
    }

    /// Whether the workspace of a running instance answers, for a provider that knows (the
    /// simulator's, whose workspaces are not programs): `None` means ask the workspace with
    /// the readiness probe.
    fn answers(&self, id: &InstanceId) -> Option<bool> {
        let _ = id;
        None
    }

    /// Stops an instance for good. Terminating an instance that is already gone succeeds, or
    /// answers [`ProviderError::NotFound`] on a provider whose listings lag (where it may mean
    /// that the instance is too new to be known yet).
    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError>;
}
