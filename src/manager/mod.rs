//! The pool manager: carries out the pure pool's decisions with a provider. It answers the
//! commands (request, status, delete), and its reconcile loop keeps the pools topped up,
//! probes launching instances, retires those that never get ready, and keeps the pool in step
//! with the provider, the source of truth (I5).
//!
//! The provider may be eventually consistent (EC2 is): a new instance can be missing from
//! listings, and unknown to `CreateTags` and `TerminateInstances`, for seconds after its
//! launch. So an instance missing from listings is forgotten only once a lookup confirms it
//! gone or it has been missing for the provider's grace period; an instance the pool does not
//! know is left alone while it may be one of its own launches in flight; after a start the
//! pool launches nothing until a listing taken after the provider's lag is in; and a launch
//! whose answer was lost keeps counting against the maximum until its instance is found.
//!
//! Nobody is told an instance is theirs before the provider has recorded the ownership (I2):
//! a request waits for the tag write under way, however many requests the user sends.
//! Owner writes and launches run as tasks of their own, so a caller that hangs up stops
//! neither.
//!
//! Locking: one `std::sync::Mutex` over all pools, never held across an `await`. Provider
//! calls happen outside it; their outcomes are fed back into the pools under it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, info, warn};
use serde::Serialize;
use tokio::sync::{watch, Notify};

pub mod background;
mod books;
pub use books::policy_label;
pub mod links;
pub mod probe;

use crate::audit::{self, Kind as Audit};
use crate::clock::Clock;
use crate::config::{OnIdle, Purpose};
use crate::core::breaker::{AfterFailure, Breaker, BreakerSettings, Permit, Refusal};
use crate::core::ids::{InstanceId, UserId};
use crate::core::pool::{Adoption, Census, Grant, Phase, Pool, PoolError, Ticket};
use crate::core::presence::{unknown_is_settled, Grace, Presence, Sighting};
use crate::core::warm::WarmPolicy;
use crate::metrics::metrics;
use crate::provider::{
    Consistency, InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState,
    TAG_ASSIGNED_AT, TAG_LAST_ACTIVITY, TAG_STOPPED_AT, TAG_USER,
};
use links::UserLinks;
use probe::probe;

/// How long a caller waits for a launch (its own or one it took over) to answer.
const LAUNCH_WAIT: Duration = Duration::from_secs(120);
/// How long a caller waits for the provider to record them as an instance's owner before
/// being told to ask again (the write goes on, and the instance stays theirs).
const RECORD_WAIT: Duration = Duration::from_secs(20);
/// The longest pause between two tries of an owner write.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);
/// Warm-up launches at once: enough to fill a pool quickly, few enough to leave the CPU to
/// requests (a local launch is a fork and an exec; an EC2 one is paced by its own bucket).
const WARMUPS_AT_ONCE: usize = 4;
/// The least time between two rounds woken by changes.
const MIN_ROUND_GAP: Duration = Duration::from_millis(100);
/// How long a terminated instance is not adopted back from a listing.
const TOMBSTONE_MS: u64 = 10 * 60 * 1000;
/// How long a command waits for the pool to be rebuilt from the provider after a start.
const RECOVERY_WAIT: Duration = Duration::from_secs(20);
/// Starts remembered per purpose for its usual time to ready.
const READY_TIMES_KEPT: usize = 20;
/// A user action this recent makes an assigned instance `assigned_active` in the
/// instance-seconds; longer ago, `assigned_idle`.
const ACTIVE_WINDOW_MS: u64 = 5 * 60 * 1000;

/// How fast the arrival history forgets old weeks when the policy does not say (it is kept
/// for every policy, so that switching to `forecast` starts from what was seen).
const DEFAULT_ALPHA: f64 = 0.3;
/// The time to ready the `forecast` policy assumes before any start was measured.
const ASSUMED_READY_MS: u64 = 120_000;

/// Rounds of one request through the pool (a wait ends, the pool is asked again) at most.
const REQUEST_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("unknown purpose `{given}`: use one of {known}")]
    UnknownPurpose { given: String, known: String },
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("the launch of an instance for this user failed: {0}")]
    LaunchFailed(String),
    #[error("{0}")]
    LaunchesPaused(String),
    #[error("{0}")]
    ResumeFailed(String),
    #[error("instance {0} is being recorded as yours with the provider, which is slow to answer; ask again in a few seconds: you will get the same instance")]
    Recording(InstanceId),
    #[error(
        "the pool is still being rebuilt from the provider after a start; retry in a few seconds"
    )]
    Recovering,
    #[error("{0}")]
    NotPausable(String),
    #[error("this rstudio-pool is handing the pool over to its new version (a graceful upgrade); retry in a second, the new one answers")]
    HandingOver,
}

/// One instance as the admin page lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    pub id: InstanceId,
    pub purpose: String,
    pub owner: Option<String>,
    pub state: &'static str,
    pub age_ms: u64,
    /// Since its owner's last action, for an assigned ready instance.
    pub idle_for_ms: Option<u64>,
    pub address: Option<String>,
    /// Whether the admin page offers to pause it.
    pub pausable: bool,
}

/// Why an instance is terminated, as the metrics and the audit log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its user was idle past the purpose's timeout.
    Idle,
    /// `DELETE` from the application.
    Deleted,
    /// An operator, from the admin page.
    Admin,
    /// It never became ready, or died while starting.
    FailedStart,
    /// Paused past its lifetime, or the oldest over the cap of paused instances.
    PausedExpired,
    /// Not the pool's to keep: stopped outside the pool, no purpose, surplus.
    Orphan,
    /// Its owner could not be recorded; nobody was told of it.
    Unrecordable,
    /// Free and warm beyond what the warm policy keeps now.
    Surplus,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Idle => "idle",
            End::Deleted => "deleted",
            End::Admin => "admin",
            End::FailedStart => "failed_start",
            End::PausedExpired => "paused_expired",
            End::Orphan => "orphan",
            End::Unrecordable => "unrecordable",
            End::Surplus => "surplus",
        }
    }

    fn audit(self) -> Audit {
        match self {
            End::Idle => Audit::Cull,
            End::Deleted | End::Admin => Audit::Delete,
            _ => Audit::Terminate,
        }
    }
}

/// How a launch ended: the new instance, or the reason it failed in words for the caller.
type LaunchOutcome = Result<InstanceId, String>;

/// What `REQUEST_RSTUDIO` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub instance_id: InstanceId,
    pub user_id: String,
    pub purpose: String,
    /// `launching`, `resuming` or `ready`.
    pub status: &'static str,
    pub ready: bool,
    /// Where the user opens the workspace, through the proxy.
    pub url: String,
}

/// What `GET_STATUS {instanceId}` answers about one instance.
#[derive(Debug, Clone)]
pub struct InstanceView {
    pub id: InstanceId,
    pub purpose: String,
    pub phase: Phase,
    pub owner: Option<UserId>,
    pub record: InstanceRecord,
}

/// What the proxy needs to serve one instance: where it is, whose it is, how its purpose is
/// proxied, and the clock of its user's activity. Cached per instance and invalidated by the
/// manager whenever the instance changes (ready, released, gone).
#[derive(Debug)]
pub struct Upstream {
    pub id: InstanceId,
    pub purpose: Arc<Purpose>,
    /// `address` as a ready-made `Host` header value.
    pub host_header: Option<http::HeaderValue>,
    /// `address` parsed, when it is an IP address (a name is resolved by the proxy).
    pub socket: Option<std::net::SocketAddr>,
    /// The root-path header and its value (`X-RStudio-Root-Path: /i-<id>`), for purposes
    /// served from their root under path routing.
    pub root_path: Option<(http::HeaderName, http::HeaderValue)>,
    /// `host:port` of the workspace, when known.
    pub address: Option<String>,
    pub owner: Option<UserId>,
    pub ready: bool,
    /// How far the start has come, for the progress page.
    pub stage: Stage,
    /// Since when it has been starting (its launch or its resume), ms since the epoch.
    pub since_ms: u64,
    /// The user's last activity in ms since the epoch; the proxy moves it, the idle reaper
    /// reads it. Shared, lock-free.
    pub activity: Arc<AtomicU64>,
}

impl Upstream {
    /// Records a user's activity now. Throttled to one store a second, so that a busy
    /// connection does not bounce the cache line between cores on every chunk.
    pub fn touch(&self, now_ms: u64) {
        if now_ms >= self.activity.load(Ordering::Relaxed) + 1000 {
            self.activity.store(now_ms, Ordering::Relaxed);
        }
    }
}

/// The header that tells a prefix-stripped workspace its root, with its value for `id`.
fn root_path_header(
    purpose: &Purpose,
    id: &InstanceId,
) -> Option<(http::HeaderName, http::HeaderValue)> {
    let name = purpose
        .root_path_header
        .as_deref()
        .filter(|_| purpose.strip_prefix)?;
    Some((
        http::HeaderName::from_bytes(name.as_bytes()).ok()?,
        http::HeaderValue::from_str(&format!("/{id}")).ok()?,
    ))
}

/// The cache in front of [`PoolManager::upstream`], public so that the routing benchmark
/// measures the very structure the proxy reads.
pub fn upstream_cache() -> moka::sync::Cache<InstanceId, Arc<Upstream>> {
    moka::sync::Cache::builder()
        .max_capacity(1_000_000)
        // A safety net only: every change of an instance invalidates its entry.
        .time_to_live(Duration::from_secs(30))
        .build()
}

/// The start of an instance as a user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The provider is bringing the machine up.
    Launching,
    /// The machine runs; the workspace does not answer yet.
    Starting,
    Ready,
    /// Stopped while its owner was away, their work kept; their next request resumes it.
    Paused,
}

/// An instance whose start failed, remembered for a while so that its user's page can say so
/// and offer a retry.
#[derive(Debug, Clone)]
pub struct Failure {
    pub owner: Option<UserId>,
    pub purpose: String,
    pub reason: String,
}

/// What the manager knows about an instance beyond the pool's view.
struct Known {
    purpose: String,
    record: InstanceRecord,
    /// When it was assigned (ms since the epoch), from its tag.
    assigned_at: Option<u64>,
    activity: Arc<AtomicU64>,
    /// The last activity saved in the instance's tags.
    saved_activity: u64,
    /// Launched or resumed by this process: its idle clock starts when it becomes ready.
    /// (One adopted after a restart keeps the clock its tags saved.)
    fresh: bool,
    /// Since when it has been starting (its launch, or its resume): for the readiness timeout.
    starting_since: u64,
    /// When it was paused, from its tag.
    stopped_at: Option<u64>,
}

impl Known {
    fn new(purpose: String, record: InstanceRecord) -> Self {
        let assigned_at = record.time_tag(TAG_ASSIGNED_AT);
        let saved_activity = record.time_tag(TAG_LAST_ACTIVITY).unwrap_or(0);
        Self {
            purpose,
            assigned_at,
            activity: Arc::new(AtomicU64::new(saved_activity)),
            saved_activity,
            fresh: false,
            starting_since: record.launched_at_ms,
            stopped_at: record.time_tag(TAG_STOPPED_AT),
            record,
        }
    }
}

impl Known {
    /// When its user last acted, counting the assignment (or, without one, the launch) as an
    /// action: what idleness is measured from, for the reaper, the admin page and the cost.
    fn last_action(&self) -> u64 {
        self.activity
            .load(Ordering::Relaxed)
            .max(self.assigned_at.unwrap_or(self.record.launched_at_ms))
    }
}

/// The tags that make `user` the owner of an instance, assigned at `now`.
fn owner_tags(user: &UserId, now: u64) -> Vec<(String, String)> {
    vec![
        (TAG_USER.to_owned(), user.as_str().to_owned()),
        (TAG_ASSIGNED_AT.to_owned(), now.to_string()),
    ]
}

/// A client token for one launch: 32 hex digits, well within EC2's 64 characters whatever
/// the pool's name.
fn client_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// How an owner write ended: recorded, or why not, in words for the caller.
type RecordOutcome = Result<(), String>;

/// What a request waits for before it asks the pool again.
enum Wait {
    /// Nothing: answer with this instance.
    Done(InstanceId),
    /// Nothing either: what there was to wait for has ended; ask again.
    Again,
    /// The owner write of this instance.
    Record(InstanceId, watch::Receiver<Option<RecordOutcome>>),
    /// A launch.
    Launch(watch::Receiver<Option<LaunchOutcome>>),
    /// The start of the user's paused instance.
    Resume(watch::Receiver<Option<RecordOutcome>>),
    /// The next listing: after a start, listings may still hide the user's instance.
    Settling,
}

/// What a request sets going.
enum Start {
    Record(InstanceId),
    Launch(Ticket),
    Resume(InstanceId),
}

/// Waits for an outcome at most `limit`: `Ok` when it succeeded (the caller asks the pool
/// again), the failure's words, or `None` when the time ran out.
async fn wait_outcome<T: Clone>(
    mut rx: watch::Receiver<Option<Result<T, String>>>,
    limit: Duration,
) -> Result<(), Option<String>> {
    match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
        Ok(Ok(outcome)) => match outcome.clone() {
            Some(Err(reason)) => Err(Some(reason)),
            _ => Ok(()),
        },
        // The sender is gone without an outcome: ask the pool again.
        Ok(Err(_)) => Ok(()),
        Err(_) => Err(None),
    }
}

/// A launch whose answer was lost: its instance may turn up in a listing.
struct Doubt {
    purpose: String,
    ticket: Ticket,
    since_ms: u64,
}

struct State {
    pools: BTreeMap<String, Pool>,
    known: HashMap<InstanceId, Known>,
    /// Outcome channels of pending launches, for callers waiting on a launch.
    waits: HashMap<(String, Ticket), watch::Sender<Option<LaunchOutcome>>>,
    /// Outcome channels of owner writes under way, for callers waiting to be told.
    recordings: HashMap<InstanceId, watch::Sender<Option<RecordOutcome>>>,
    /// Outcome channels of resumes under way (the provider's start), for their owners.
    resumes: HashMap<InstanceId, watch::Sender<Option<RecordOutcome>>>,
    /// Instances whose stop is under way: a resume waits for it to finish first.
    pausing: HashSet<InstanceId>,
    /// Launches in doubt, by client token.
    doubts: HashMap<String, Doubt>,
    /// The launch breaker of each purpose.
    breakers: HashMap<String, Breaker>,
    /// Known instances that listings miss, and since when.
    presence: Presence,
    /// Instances we terminated, with when: a listing taken just before a termination still
    /// shows them, and they must not be adopted back.
    tombstones: HashMap<InstanceId, u64>,
    /// This process launches nothing before this time (ms since the epoch): after a start,
    /// the provider's listings may not show a predecessor's last launches before then.
    own_launches_from: u64,
    /// When the last listing taken in was taken.
    synced_at: u64,
    /// The last starts' times to ready (ms) per purpose, for the progress page.
    ready_times: HashMap<String, std::collections::VecDeque<u64>>,
    /// The pool's books (what it cost), kept across restarts in `STATE_DIR/<pool>.books.json`.
    ledger: crate::core::ledger::Ledger,
    /// Arrivals per hour of the week, per purpose, for the `forecast` warm policy.
    history: HashMap<String, crate::core::warm::History>,
    /// What each instance was doing when the books were last saved by the previous process:
    /// the time between that save and this process's first count is put on them.
    restored: Option<Vec<(InstanceId, crate::core::ledger::Entry)>>,
}

impl State {
    /// Whether the listings have caught up since the start: a listing taken once the
    /// provider's lag had passed has been taken in, so no predecessor's instance is hidden
    /// (from the count against the maximum, or from its owner). Until then nothing is
    /// launched, and users who hold nothing wait.
    fn caught_up(&self) -> bool {
        self.synced_at >= self.own_launches_from
    }

    /// The owner of `id` in its pool.
    fn owner(&self, purpose: &str, id: &InstanceId) -> Option<UserId> {
        self.pools
            .get(purpose)
            .and_then(|p| p.instance(id))
            .and_then(|i| i.owner.clone())
    }
}

pub struct PoolManager {
    provider: Arc<dyn Provider>,
    purposes: BTreeMap<String, Arc<Purpose>>,
    links: UserLinks,
    /// The proxy's view of each instance, so that a request takes no lock.
    upstreams: moka::sync::Cache<InstanceId, Arc<Upstream>>,
    /// Instances whose start failed, for an hour.
    failures: moka::sync::Cache<InstanceId, Arc<Failure>>,
    /// Bumped whenever an instance becomes ready, for callers that wait for it.
    readiness: watch::Sender<u64>,
    ready_timeout: Duration,
    /// How far the provider's listings lag, and the graces that follow from it.
    consistency: Consistency,
    grace: Grace,
    state: Mutex<State>,
    /// Wakes the reconcile loop early (after an assignment or a termination).
    changed: Notify,
    /// True once the pools were rebuilt from the provider after start.
    recovered: watch::Sender<bool>,
    /// Bumped whenever a listing is taken in, for requests waiting until launches may be made.
    synced: watch::Sender<u64>,
    /// Warm-up launches under way at once, at most.
    warmups: tokio::sync::Semaphore,
    /// The lock on the state folder that makes this the only manager of the pool, given up
    /// on a hand-over.
    state_lock: std::sync::Mutex<Option<std::fs::File>>,
    /// Set once a graceful upgrade began: the new process manages the pool from now on, and
    /// this one changes nothing (no assignment, no reconcile round).
    handing_over: std::sync::atomic::AtomicBool,
    /// Where the time comes from: the wall clock, or the simulator's virtual one.
    clock: Clock,
    /// Where the books are saved, once [`Self::keep_books`] was called.
    books: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl PoolManager {
    pub fn new(
        provider: Arc<dyn Provider>,
        purposes: BTreeMap<String, Purpose>,
        links: UserLinks,
        ready_timeout: Duration,
        breaker: BreakerSettings,
    ) -> Arc<Self> {
        Self::with_clock(
            provider,
            purposes,
            links,
            ready_timeout,
            breaker,
            Clock::Wall,
        )
    }

    /// A manager that reads the time from `clock` (the simulator's is virtual).
    pub fn with_clock(
        provider: Arc<dyn Provider>,
        purposes: BTreeMap<String, Purpose>,
        links: UserLinks,
        ready_timeout: Duration,
        breaker: BreakerSettings,
        clock: Clock,
    ) -> Arc<Self> {
        let pools = purposes
            .iter()
            .map(|(name, p)| (name.clone(), Pool::new(p.limits)))
            .collect();
        let breakers = purposes
            .keys()
            .map(|name| (name.clone(), Breaker::new(breaker)))
            .collect();
        let consistency = provider.consistency();
        let grace = Grace {
            missing_ms: consistency.missing_grace.as_millis() as u64,
            unknown_ms: (provider.launch_deadline() + consistency.listing_lag).as_millis() as u64,
        };
        Arc::new(Self {
            provider,
            purposes: purposes
                .into_iter()
                .map(|(name, p)| (name, Arc::new(p)))
                .collect(),
            upstreams: upstream_cache(),
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            readiness: watch::channel(0).0,
            links,
            ready_timeout,
            consistency,
            grace,
            state: Mutex::new(State {
                pools,
                known: HashMap::new(),
                waits: HashMap::new(),
                recordings: HashMap::new(),
                resumes: HashMap::new(),
                pausing: HashSet::new(),
                doubts: HashMap::new(),
                breakers,
                presence: Presence::default(),
                tombstones: HashMap::new(),
                // Nothing may be launched before the first listing is in.
                own_launches_from: u64::MAX,
                synced_at: 0,
                ready_times: HashMap::new(),
                ledger: crate::core::ledger::Ledger::default(),
                history: HashMap::new(),
                restored: None,
            }),
            changed: Notify::new(),
            recovered: watch::channel(false).0,
            synced: watch::channel(0).0,
            warmups: tokio::sync::Semaphore::new(WARMUPS_AT_ONCE),
            state_lock: std::sync::Mutex::new(None),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            clock,
            books: std::sync::Mutex::new(None),
        })
    }

    /// Milliseconds since the epoch, by the manager's clock.
    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation under this lock is a single call into the pure pool, which leaves it
        // consistent even if a panic unwinds: recover the guard rather than poison the server.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn provider_kind(&self) -> &'static str {
        self.provider.kind()
    }

    fn purpose(&self, name: &str) -> Result<&Arc<Purpose>, ManagerError> {
        self.purposes
            .get(name)
            .ok_or_else(|| ManagerError::UnknownPurpose {
                given: name.chars().take(64).collect(),
                known: self
                    .purposes
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Waits until the pools were rebuilt from the provider after the start, at most a
    /// little while; every command answers from the rebuilt pools only.
    pub async fn wait_recovered(&self) -> Result<(), ManagerError> {
        let mut rx = self.recovered.subscribe();
        let done = matches!(
            tokio::time::timeout(RECOVERY_WAIT, rx.wait_for(|done| *done)).await,
            Ok(Ok(_))
        );
        if done {
            Ok(())
        } else {
            Err(ManagerError::Recovering)
        }
    }

    pub fn is_recovered(&self) -> bool {
        *self.recovered.borrow()
    }

    // ---- Commands ----

    /// `REQUEST_RSTUDIO`: the user's instance of `purpose`, assigning or launching one if they
    /// hold none. Answers once the provider has recorded the user as the owner (for a launch:
    /// once it answered), without waiting for the workspace to be ready.
    pub async fn request(
        self: &Arc<Self>,
        user: &UserId,
        purpose: &str,
    ) -> Result<Assignment, ManagerError> {
        self.purpose(purpose)?;
        self.check_not_handing_over()?;
        let started = std::time::Instant::now();
        let mut served = None;
        let result = self.request_rounds(user, purpose, &mut served).await;
        if let Ok(assignment) = &result {
            // Asking for one's workspace is a user action: its idle clock starts again (after
            // a restart, the tag read back may be older than the request that resumed it).
            let st = self.lock();
            if let Some(known) = st.known.get(&assignment.instance_id) {
                known.activity.fetch_max(self.now(), Ordering::Relaxed);
            }
        }
        let outcome = match &result {
            Ok(_) => served.unwrap_or("existing"),
            Err(ManagerError::Pool(PoolError::Full { .. } | PoolError::FullForResume { .. })) => {
                "pool_full"
            }
            Err(_) => "failed",
        };
        let m = metrics();
        m.assignments.with_label_values(&[purpose, outcome]).inc();
        m.assignment_seconds
            .with_label_values(&[purpose])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// [`Self::request`]'s rounds; `served` says how the first round served it.
    async fn request_rounds(
        self: &Arc<Self>,
        user: &UserId,
        purpose: &str,
        served: &mut Option<&'static str>,
    ) -> Result<Assignment, ManagerError> {
        self.wait_recovered().await?;
        let started = tokio::time::Instant::now();
        let mut rounds = 0;
        while rounds < REQUEST_ROUNDS {
            rounds += 1;
            let (wait, start) = self.grant(user, purpose)?;
            if served.is_none() {
                *served = match (&start, &wait) {
                    (Some(Start::Record(_)), _) => Some("warm"),
                    (Some(Start::Launch(_)), _) | (None, Wait::Launch(_)) => Some("launched"),
                    (Some(Start::Resume(_)), _) | (None, Wait::Resume(_)) => Some("resumed"),
                    (None, Wait::Done(_) | Wait::Record(..)) => Some("existing"),
                    (None, Wait::Again | Wait::Settling) => None,
                };
            }
            match start {
                Some(Start::Record(id)) => {
                    info!("assigning {id} ({purpose}) to {user}");
                    tokio::spawn(Arc::clone(self).record_owner(id, user.clone()));
                }
                Some(Start::Launch(ticket)) => {
                    tokio::spawn(Arc::clone(self).launch(purpose.to_owned(), ticket, false));
                }
                Some(Start::Resume(id)) => {
                    info!("resuming {id} ({purpose}) for {user}");
                    tokio::spawn(Arc::clone(self).resume(id));
                }
                None => {}
            }
            match wait {
                Wait::Done(id) => return Ok(self.assignment(&id, user, purpose)),
                Wait::Again => {}
                Wait::Record(id, rx) => {
                    wait_outcome(rx, RECORD_WAIT)
                        .await
                        .map_err(|failed| match failed {
                            Some(reason) => ManagerError::LaunchFailed(reason),
                            None => ManagerError::Recording(id),
                        })?
                }
                Wait::Resume(rx) => {
                    wait_outcome(rx, LAUNCH_WAIT).await.map_err(|failed| {
                        ManagerError::ResumeFailed(failed.unwrap_or_else(|| {
                            "the resume did not answer in time; ask again".into()
                        }))
                    })?
                }
                Wait::Launch(rx) => wait_outcome(rx, LAUNCH_WAIT).await.map_err(|failed| {
                    ManagerError::LaunchFailed(failed.unwrap_or_else(|| {
                        "the launch did not finish in time; send the request again".into()
                    }))
                })?,
                Wait::Settling => {
                    // The provider's listings may still hide a predecessor's last launches
                    // (this user's among them): wait for the next listing.
                    if started.elapsed() > self.consistency.listing_lag + RECOVERY_WAIT {
                        return Err(ManagerError::Recovering);
                    }
                    rounds -= 1;
                    let mut synced = self.synced.subscribe();
                    let _ = tokio::time::timeout(Duration::from_secs(1), synced.changed()).await;
                }
            }
        }
        Err(ManagerError::LaunchFailed(
            "the instance changed while this request waited for it; send the request again".into(),
        ))
    }

    /// The pool's answer to `user`, turned into what the request waits for (subscribed under
    /// the lock, so that no outcome is missed) and what it sets going.
    fn grant(&self, user: &UserId, purpose: &str) -> Result<(Wait, Option<Start>), ManagerError> {
        let mut st = self.lock();
        let st = &mut *st;
        let settled = st.caught_up();
        let pool = st.pools.get_mut(purpose).expect("a pool per purpose");
        // Until the listings have caught up after a start, a user who holds nothing may own
        // an instance they are not showing yet: neither a free one nor a launch for them.
        if !settled && pool.holding(user).is_none() {
            return Ok((Wait::Settling, None));
        }
        let arrival = pool.holding(user).is_none();
        let grant = pool.request(user)?;
        if arrival {
            // A user who needs an instance: what the forecast learns from.
            let alpha = match &self.purposes[purpose].warm {
                WarmPolicy::Forecast(f) => f.alpha,
                _ => DEFAULT_ALPHA,
            };
            st.history
                .entry(purpose.to_owned())
                .or_default()
                .record_arrival(self.now(), alpha);
        }
        if let Grant::Launch(ticket) = grant {
            let breaker = st.breakers.get_mut(purpose).expect("a breaker per purpose");
            match breaker.permit(self.now(), true) {
                Ok(Permit::Probe) => info!("{purpose}: trying one launch after the pause"),
                Ok(Permit::Launch) => {}
                Err(refusal) => {
                    pool.launch_failed(ticket);
                    return Err(ManagerError::LaunchesPaused(paused_message(
                        purpose,
                        &refusal,
                        self.now(),
                    )));
                }
            }
            st.waits
                .insert((purpose.to_owned(), ticket), watch::channel(None).0);
        }
        if let Grant::Assigned(id) = &grant {
            st.recordings.insert(id.clone(), watch::channel(None).0);
            self.upstreams.invalidate(id);
        }
        if let Grant::Resume(id) = &grant {
            st.resumes.insert(id.clone(), watch::channel(None).0);
            self.upstreams.invalidate(id);
        }
        let launch_wait = |ticket: Ticket| {
            st.waits
                .get(&(purpose.to_owned(), ticket))
                .map_or(Wait::Again, |tx| Wait::Launch(tx.subscribe()))
        };
        let record_wait = |id: InstanceId| match st.recordings.get(&id) {
            Some(tx) => Wait::Record(id, tx.subscribe()),
            None => Wait::Again,
        };
        let resume_wait = |id: &InstanceId| match st.resumes.get(id) {
            Some(tx) => Wait::Resume(tx.subscribe()),
            None => Wait::Again,
        };
        Ok(match grant {
            Grant::Held(id) => (Wait::Done(id), None),
            Grant::Recording(id) => (record_wait(id), None),
            Grant::Pending(ticket) => (launch_wait(ticket), None),
            Grant::Assigned(id) => (record_wait(id.clone()), Some(Start::Record(id))),
            Grant::Launch(ticket) => (launch_wait(ticket), Some(Start::Launch(ticket))),
            Grant::Resume(id) => (resume_wait(&id), Some(Start::Resume(id))),
        })
    }

    /// Records `user` as the owner of `id` with the provider, then lets the waiting callers
    /// be told. Tries until the write lands: a tag write whose answer was lost may have
    /// landed, so giving the instance to someone else would make it two users' (I2). Gives
    /// up only when the instance is gone, someone else ended it, or the provider refuses for
    /// good (then the instance is terminated: nobody was told of it).
    async fn record_owner(self: Arc<Self>, id: InstanceId, user: UserId) {
        let assigned_at = self.now();
        let tags = owner_tags(&user, assigned_at);
        let mut pause = Duration::from_millis(200);
        let outcome = loop {
            let still_theirs = {
                let st = self.lock();
                st.known
                    .get(&id)
                    .is_some_and(|k| st.owner(&k.purpose, &id).as_ref() == Some(&user))
            };
            if !still_theirs {
                break Err(format!(
                    "instance {id} was ended while it was being recorded as yours; send the request again"
                ));
            }
            match self.provider.set_tags(&id, &tags).await {
                Ok(()) => break Ok(()),
                Err(ProviderError::NotFound(_)) if !self.surely_gone(&id) => {
                    // Just launched: EC2 does not know it everywhere yet.
                }
                Err(ProviderError::NotFound(_)) => {
                    warn!("{id} is gone at the provider while {user} was being recorded as its owner; forgetting it");
                    self.forget(&id);
                    break Err(format!(
                        "instance {id} is gone at the provider; send the request again"
                    ));
                }
                Err(ProviderError::Unavailable(e)) => {
                    warn!("recording {user} as the owner of {id}: {e}; trying again");
                }
                Err(e) => {
                    error!("cannot record {user} as the owner of {id}: {e}; terminating it (nobody was told of it)");
                    let _ = self.terminate(&id, End::Unrecordable).await;
                    break Err(format!("could not record the owner of {id}: {e}"));
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RECORD_RETRY_MAX);
        };
        let tx = {
            let mut st = self.lock();
            if outcome.is_ok() {
                if let Some(known) = st.known.get_mut(&id) {
                    known.assigned_at = Some(assigned_at);
                    let purpose = known.purpose.clone();
                    if let Some(pool) = st.pools.get_mut(&purpose) {
                        let _ = pool.recorded(&id);
                    }
                }
                let purpose = st.known.get(&id).map(|k| k.purpose.clone());
                audit::record(
                    Audit::Assign,
                    Some(&user),
                    Some(&id),
                    purpose.as_deref(),
                    "assigned",
                );
            }
            st.recordings.remove(&id)
        };
        self.upstreams.invalidate(&id);
        if let Some(tx) = tx {
            tx.send_replace(Some(outcome));
        }
        self.changed.notify_one();
    }

    /// Starts the owner's paused instance again, and lets them know how it went. On a failure
    /// the instance stays paused, with their work: never a fresh instance in its place.
    async fn resume(self: Arc<Self>, id: InstanceId) {
        // A stop still under way finishes first: starting before it would be undone by it.
        let deadline = tokio::time::Instant::now() + LAUNCH_WAIT;
        while self.lock().pausing.contains(&id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let outcome = match self.provider.start(&id).await {
            Ok(record) => {
                let mut st = self.lock();
                if let Some(known) = st.known.get(&id) {
                    let owner = st.owner(&known.purpose, &id);
                    metrics().resumes.with_label_values(&[&known.purpose]).inc();
                    audit::record(
                        Audit::Resume,
                        owner.as_ref(),
                        Some(&id),
                        Some(&known.purpose),
                        "its owner came back",
                    );
                }
                if let Some(known) = st.known.get_mut(&id) {
                    if let Some(record) = record {
                        known.record.address = record.address;
                        known.record.state = record.state;
                    }
                    known.fresh = true;
                    known.starting_since = self.now();
                    known.stopped_at = None;
                }
                Ok(())
            }
            Err(e) => {
                warn!("cannot resume {id}: {e}; it stays paused");
                let mut st = self.lock();
                if let Some(purpose) = st.known.get(&id).map(|k| k.purpose.clone()) {
                    if let Some(pool) = st.pools.get_mut(&purpose) {
                        let _ = pool.resume_failed(&id);
                    }
                }
                Err(format!("your workspace {id} could not be resumed ({e}); it is still paused with your work: ask again in a while"))
            }
        };
        self.upstreams.invalidate(&id);
        if let Some(tx) = self.lock().resumes.remove(&id) {
            tx.send_replace(Some(outcome));
        }
        self.changed.notify_one();
    }

    /// Marks `id` paused in its pool: the provider has stopped it, or (`stopping`) is about
    /// to, and then a resume waits for that stop, marked under the same lock so that no
    /// resume slips in between. Returns when it was paused, if it was.
    fn lock_pause(&self, id: &InstanceId, stopping: bool) -> Result<Option<u64>, PoolError> {
        let now = self.now();
        let paused = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(known) = st.known.get_mut(id) else {
                return Err(PoolError::UnknownInstance(id.clone()));
            };
            let pool = st
                .pools
                .get_mut(&known.purpose)
                .expect("a pool per purpose");
            if !pool.pause(id)? {
                return Ok(None);
            }
            let stopped_at = *known.stopped_at.get_or_insert(now);
            if stopping {
                st.pausing.insert(id.clone());
            }
            Some(stopped_at)
        };
        self.upstreams.invalidate(id);
        Ok(paused)
    }

    /// Pauses `id`: its owner keeps it and their work, it stops using compute (I6). The
    /// provider's stop is tried again by the reconcile loop if it fails now.
    async fn pause(&self, id: &InstanceId, hibernate: bool) -> Result<(), ManagerError> {
        let Some(stopped_at) = self.lock_pause(id, true)? else {
            return Ok(());
        };
        self.changed.notify_one();
        let tags = [(TAG_STOPPED_AT.to_owned(), stopped_at.to_string())];
        if let Err(e) = self.provider.set_tags(id, &tags).await {
            warn!("cannot tag {id} as paused: {e}");
        }
        let stopped = self.provider.stop(id, hibernate).await;
        self.lock().pausing.remove(id);
        stopped?;
        Ok(())
    }

    /// Pauses `id` for `reason` (`idle`, `admin`), counted and audited when it was running.
    async fn pause_for(
        &self,
        id: &InstanceId,
        hibernate: bool,
        reason: &'static str,
        idle_ms: u64,
    ) -> Result<(), ManagerError> {
        let before = self.instance(id);
        self.pause(id, hibernate).await?;
        if let Some(view) = before.filter(|v| v.phase == Phase::Ready) {
            metrics()
                .pauses
                .with_label_values(&[&view.purpose, reason])
                .inc();
            let cause = if reason == "idle" {
                format!("idle for {} s", idle_ms / 1000)
            } else {
                reason.to_owned()
            };
            audit::record(
                Audit::Pause,
                view.owner.as_ref(),
                Some(id),
                Some(&view.purpose),
                cause,
            );
        }
        Ok(())
    }

    /// Whether the provider not knowing `id` means it is gone: its listings never lag, or the
    /// instance is older than the grace for missing instances.
    fn surely_gone(&self, id: &InstanceId) -> bool {
        if self.grace.missing_ms == 0 {
            return true;
        }
        let launched = self.lock().known.get(id).map(|k| k.record.launched_at_ms);
        launched.is_none_or(|at| self.now().saturating_sub(at) >= self.grace.missing_ms)
    }

    fn assignment(&self, id: &InstanceId, user: &UserId, purpose: &str) -> Assignment {
        let phase = self
            .lock()
            .pools
            .get(purpose)
            .and_then(|p| p.instance(id))
            .map(|i| i.phase);
        Assignment {
            instance_id: id.clone(),
            user_id: user.as_str().to_owned(),
            purpose: purpose.to_owned(),
            status: match phase {
                Some(Phase::Ready) => "ready",
                Some(Phase::Resuming) => "resuming",
                _ => "launching",
            },
            ready: phase == Some(Phase::Ready),
            url: self.links.for_user(id, user, self.now()),
        }
    }

    /// A link for `user` to open `id` (with a fresh token in token mode).
    pub fn user_link(&self, id: &InstanceId, user: &UserId) -> String {
        self.links.for_user(id, user, self.now())
    }

    /// The workspace's address through the proxy, without credentials.
    pub fn user_url(&self, id: &InstanceId) -> String {
        self.links.base(id)
    }

    /// `GET_STATUS {}`: ids of the instances assigned to users (and recorded as theirs),
    /// every purpose, sorted.
    pub fn assigned(&self) -> Vec<InstanceId> {
        let st = self.lock();
        let mut ids: Vec<InstanceId> = st
            .pools
            .values()
            .flat_map(|p| {
                p.instances()
                    .filter(|(_, i)| {
                        i.owner.is_some() && i.recorded && i.phase != Phase::Terminating
                    })
                    .map(|(id, _)| id.clone())
            })
            .collect();
        ids.sort();
        ids
    }

    /// Counts per purpose.
    pub fn census(&self) -> BTreeMap<String, Census> {
        self.lock()
            .pools
            .iter()
            .map(|(name, p)| (name.clone(), p.census()))
            .collect()
    }

    /// The state of an instance as operators read it: `launching`, `free`, `assigned`,
    /// `resuming`, `paused` or `terminating`.
    fn state_label(instance: &crate::core::pool::Instance) -> &'static str {
        match instance.phase {
            Phase::Launching => "launching",
            Phase::Ready if instance.owner.is_some() => "assigned",
            Phase::Ready => "free",
            Phase::Resuming => "resuming",
            Phase::Paused => "paused",
            Phase::Terminating => "terminating",
        }
    }

    /// Sets the gauges that describe the pools (instances by state, users, limits, paused
    /// launches) from what the pools hold now, and accrues instance-seconds. Called when
    /// the metrics are scraped.
    pub fn observe(&self) {
        self.accrue();
        let m = metrics();
        let now = self.now();
        let st = self.lock();
        for (purpose, pool) in &st.pools {
            let mut counts: HashMap<&str, i64> = HashMap::new();
            let mut users = 0;
            for (_, instance) in pool.instances() {
                *counts.entry(Self::state_label(instance)).or_default() += 1;
                if instance.owner.is_some() && instance.phase != Phase::Terminating {
                    users += 1;
                }
            }
            for state in crate::metrics::INSTANCE_STATES {
                m.instances
                    .with_label_values(&[purpose, state])
                    .set(counts.get(state).copied().unwrap_or(0));
            }
            m.users.with_label_values(&[purpose]).set(users);
            let limits = self.purposes[purpose].limits;
            m.min_free
                .with_label_values(&[purpose])
                .set(pool.min_free() as i64);
            m.max.with_label_values(&[purpose]).set(limits.max as i64);
            let paused = st
                .breakers
                .get(purpose)
                .is_some_and(|b| matches!(b.refusal(now), Some(Refusal::Paused { .. })));
            m.launches_paused
                .with_label_values(&[purpose])
                .set(i64::from(paused));
        }
        m.recovered.set(i64::from(self.is_recovered()));
        drop(st);
        self.observe_books();
    }

    /// Every instance the pools hold, for the admin page: sorted by purpose, then id.
    pub fn instances(&self) -> Vec<InstanceSummary> {
        let now = self.now();
        let st = self.lock();
        let mut out = Vec::new();
        for (purpose, pool) in &st.pools {
            for (id, instance) in pool.instances() {
                let known = st.known.get(id);
                let idle_for_ms = match (&instance.owner, instance.phase) {
                    (Some(_), Phase::Ready) => known.map(|k| now.saturating_sub(k.last_action())),
                    _ => None,
                };
                out.push(InstanceSummary {
                    id: id.clone(),
                    purpose: purpose.clone(),
                    owner: instance.owner.as_ref().map(|u| u.as_str().to_owned()),
                    state: Self::state_label(instance),
                    age_ms: known.map_or(0, |k| now.saturating_sub(k.record.launched_at_ms)),
                    idle_for_ms,
                    address: known.and_then(|k| k.record.address.clone()),
                    pausable: instance.owner.is_some()
                        && instance.phase == Phase::Ready
                        && self.purposes[purpose].on_idle != OnIdle::Terminate,
                });
            }
        }
        out
    }

    /// Each purpose's free instances kept now (its warm policy's target) and maximum.
    pub fn limits(&self) -> BTreeMap<String, (usize, usize)> {
        let st = self.lock();
        self.purposes
            .iter()
            .map(|(name, p)| {
                let min_free = st.pools.get(name).map_or(p.limits.min_free, Pool::min_free);
                (name.clone(), (min_free, p.limits.max))
            })
            .collect()
    }

    /// The usual time to ready of `purpose` (the median of its last starts), once known.
    pub fn usual_ready(&self, purpose: &str) -> Option<Duration> {
        let st = self.lock();
        let times = st.ready_times.get(purpose).filter(|t| !t.is_empty())?;
        let mut sorted: Vec<u64> = times.iter().copied().collect();
        sorted.sort_unstable();
        Some(Duration::from_millis(sorted[sorted.len() / 2]))
    }

    /// Pauses `id` at an operator's request (the admin page); its owner's work is kept.
    pub async fn pause_now(&self, id: &InstanceId) -> Result<(), ManagerError> {
        let view = self
            .instance(id)
            .ok_or_else(|| PoolError::UnknownInstance(id.clone()))?;
        let on_idle = self.purposes[&view.purpose].on_idle;
        if on_idle == OnIdle::Terminate || view.owner.is_none() || view.phase != Phase::Ready {
            return Err(ManagerError::NotPausable(format!(
                "{id} cannot be paused: only a ready instance with an owner, of a purpose whose on_idle is stop or hibernate, can be"
            )));
        }
        self.pause_for(id, on_idle == OnIdle::Hibernate, "admin", 0)
            .await
    }

    /// Resumes `id` for its owner at an operator's request (the admin page).
    pub async fn resume_now(self: &Arc<Self>, id: &InstanceId) -> Result<(), ManagerError> {
        let view = self
            .instance(id)
            .ok_or_else(|| PoolError::UnknownInstance(id.clone()))?;
        match (view.phase, view.owner) {
            (Phase::Paused, Some(owner)) => self.request(&owner, &view.purpose).await.map(|_| ()),
            _ => Err(ManagerError::NotPausable(format!(
                "{id} is not paused: only a paused instance can be resumed"
            ))),
        }
    }

    /// Purposes whose launches are paused after failures, with why, in words.
    pub fn paused_launches(&self) -> BTreeMap<String, String> {
        let now = self.now();
        self.lock()
            .breakers
            .iter()
            .filter_map(|(purpose, b)| {
                match b.refusal(now) {
                    Some(refusal @ Refusal::Paused { .. }) => Some(refusal),
                    _ => None,
                }
                .map(|r| (purpose.clone(), paused_message(purpose, &r, now)))
            })
            .collect()
    }

    /// `GET_STATUS {instanceId}`.
    pub fn instance(&self, id: &InstanceId) -> Option<InstanceView> {
        let st = self.lock();
        let known = st.known.get(id)?;
        let instance = st.pools.get(&known.purpose)?.instance(id)?;
        Some(InstanceView {
            id: id.clone(),
            purpose: known.purpose.clone(),
            phase: instance.phase,
            owner: instance.owner.clone(),
            record: known.record.clone(),
        })
    }

    /// What the proxy needs for `id`, if the pool knows it and it is not terminating. Served
    /// from a cache that every change of the instance invalidates.
    pub fn upstream(&self, id: &str) -> Option<Arc<Upstream>> {
        if let Some(hit) = self.upstreams.get(id) {
            return Some(hit);
        }
        let id = &InstanceId::parse(id).ok()?;
        let upstream = {
            let st = self.lock();
            let known = st.known.get(id)?;
            let instance = st.pools.get(&known.purpose)?.instance(id)?;
            if instance.phase == Phase::Terminating {
                return None;
            }
            Arc::new(Upstream {
                id: id.clone(),
                purpose: Arc::clone(self.purposes.get(&known.purpose)?),
                host_header: known
                    .record
                    .address
                    .as_deref()
                    .and_then(|a| http::HeaderValue::from_str(a).ok()),
                socket: known.record.address.as_deref().and_then(|a| a.parse().ok()),
                root_path: root_path_header(self.purposes.get(&known.purpose)?, id),
                address: known.record.address.clone(),
                // Nobody's until the provider has recorded it.
                owner: instance.owner.clone().filter(|_| instance.recorded),
                ready: instance.phase == Phase::Ready,
                stage: match (instance.phase, known.record.state) {
                    (Phase::Ready, _) => Stage::Ready,
                    (Phase::Paused, _) => Stage::Paused,
                    (_, ProviderState::Running) => Stage::Starting,
                    _ => Stage::Launching,
                },
                since_ms: known.starting_since,
                activity: Arc::clone(&known.activity),
            })
        };
        self.upstreams.insert(id.clone(), Arc::clone(&upstream));
        Some(upstream)
    }

    /// Why the start of `id` failed, if it did within the last hour.
    pub fn failure(&self, id: &InstanceId) -> Option<Arc<Failure>> {
        self.failures.get(id)
    }

    /// Remembers why the start of `id` failed (with what the provider can tell of it: how
    /// its process ended, the end of its log), for its user's page, the log and the audit,
    /// and counts the failure against its purpose's launches. `cause` is the metrics' label.
    async fn start_failed(&self, id: &InstanceId, reason: String, cause: &'static str) {
        let detail = self.provider.diagnose(id).await;
        let (owner, purpose) = {
            let mut st = self.lock();
            let Some(purpose) = st.known.get(id).map(|k| k.purpose.clone()) else {
                return;
            };
            let owner = st.owner(&purpose, id);
            if let Some(breaker) = st.breakers.get_mut(&purpose) {
                // The short reason: the detail (a log's end) is logged once, below.
                note_failure(breaker, &purpose, &reason, self.now());
            }
            (owner, purpose)
        };
        let reason = match detail {
            Some(detail) => format!("{reason}: {detail}"),
            None => reason,
        };
        warn!("{id} ({purpose}) failed to start: {reason}");
        metrics()
            .launch_failures
            .with_label_values(&[&purpose, cause])
            .inc();
        audit::record(
            Audit::LaunchFailure,
            owner.as_ref(),
            Some(id),
            Some(&purpose),
            reason.lines().next().unwrap_or_default(),
        );
        self.failures.insert(
            id.clone(),
            Arc::new(Failure {
                owner,
                purpose,
                reason,
            }),
        );
    }

    /// Waits until `id` is ready, at most `limit`; true when it is.
    pub async fn wait_ready(&self, id: &InstanceId, limit: Duration) -> bool {
        let mut changes = self.readiness.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let phase = self.instance(id).map(|v| v.phase);
            match phase {
                Some(Phase::Ready) => return true,
                Some(Phase::Launching | Phase::Resuming) => {}
                _ => return false,
            }
            // Woken when any instance becomes ready; also every second, in case this one
            // failed instead.
            let wake = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = changes.changed() => {}
                _ = wake => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Keeps the pool's lock (see [`lock_state`]) for as long as this manager runs
    /// the pool.
    pub fn hold_state_lock(&self, lock: std::fs::File) {
        *self.state_lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
    }

    /// A graceful upgrade began: from now on the new process runs the pool. This one stops
    /// assigning, deleting and reconciling, and gives up the state folder's lock, which the
    /// new one waits for before it rebuilds the pool, so that two managers never assign at
    /// once. The proxy goes on serving the connections it has.
    pub fn hand_over(&self) {
        self.handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        log::info!("handing the pool over to the new process: no more assignments here");
    }

    fn check_not_handing_over(&self) -> Result<(), ManagerError> {
        if self.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ManagerError::HandingOver);
        }
        Ok(())
    }

    /// `DELETE`: terminates the instance; the pool tops up afterwards.
    pub async fn delete(&self, id: &InstanceId) -> Result<(), ManagerError> {
        self.check_not_handing_over()?;
        self.wait_recovered().await?;
        self.terminate(id, End::Deleted).await
    }

    /// Releases `id` in its pool and terminates it at the provider. On a provider failure the
    /// instance stays `Terminating` (never handed out) and the reconcile loop tries again, as
    /// it does when the provider does not know an instance that may be too new for it.
    pub async fn terminate(&self, id: &InstanceId, why: End) -> Result<(), ManagerError> {
        {
            let mut st = self.lock();
            let purpose = st
                .known
                .get(id)
                .map(|k| k.purpose.clone())
                .ok_or_else(|| PoolError::UnknownInstance(id.clone()))?;
            let owner = st.owner(&purpose, id);
            let was = st
                .pools
                .get(&purpose)
                .and_then(|p| p.instance(id))
                .map(|i| i.phase);
            if let Some(pool) = st.pools.get_mut(&purpose) {
                pool.release(id)?;
            }
            // Counted once: a second termination of one on its way out is a retry.
            if was != Some(Phase::Terminating) {
                metrics()
                    .terminations
                    .with_label_values(&[&purpose, why.label()])
                    .inc();
                audit::record(
                    why.audit(),
                    owner.as_ref(),
                    Some(id),
                    Some(&purpose),
                    why.label(),
                );
            }
        }
        // From here on the proxy answers 404 for it: never the old upstream.
        self.upstreams.invalidate(id);
        self.changed.notify_one();
        self.end(id).await
    }

    /// One try at terminating a released instance at the provider; buries it once done.
    async fn end(&self, id: &InstanceId) -> Result<(), ManagerError> {
        match self.provider.terminate(id).await {
            Ok(()) => {
                self.bury(id);
                Ok(())
            }
            Err(ProviderError::NotFound(_)) if self.surely_gone(id) => {
                self.bury(id);
                Ok(())
            }
            Err(ProviderError::NotFound(_)) => {
                warn!("the provider does not know {id} yet; its termination is tried again");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets an instance we terminated, and remembers that we did.
    fn bury(&self, id: &InstanceId) {
        self.forget(id);
        self.lock().tombstones.insert(id.clone(), self.now());
    }

    fn forget(&self, id: &InstanceId) {
        self.upstreams.invalidate(id);
        let mut st = self.lock();
        st.presence.forget(id);
        if let Some(known) = st.known.remove(id) {
            if let Some(pool) = st.pools.get_mut(&known.purpose) {
                pool.forget(id);
            }
        }
    }

    // ---- Launching ----

    /// Launches the instance of `ticket` and records the outcome for the callers waiting on
    /// it. The launch's tags name the user the ticket is for when it is sent; a user who
    /// takes the launch over later is recorded once it answered.
    async fn launch(self: Arc<Self>, purpose: String, ticket: Ticket, warm_up: bool) {
        // Warm-ups take turns, so that topping up a big pool does not starve the command API
        // and the proxy of CPU; a user's own launch never waits here.
        let _turn = if warm_up {
            self.warmups.acquire().await.ok()
        } else {
            None
        };
        let token = client_token();
        let owner = self
            .lock()
            .pools
            .get(&purpose)
            .and_then(|p| p.ticket_owner(ticket).cloned());
        let spec = LaunchSpec {
            purpose: purpose.clone(),
            tags: owner
                .as_ref()
                .map(|user| owner_tags(user, self.now()))
                .unwrap_or_default(),
            client_token: token.clone(),
        };
        let outcome = match self.provider.launch(&spec).await {
            Ok(record) => {
                let id = record.id.clone();
                let mut st = self.lock();
                let st = &mut *st;
                let pool = st.pools.get_mut(&purpose).expect("a pool per purpose");
                match pool.launched(ticket, id.clone(), owner.as_ref()) {
                    Ok(()) => {
                        let instance = pool.instance(&id).cloned();
                        let mut known = Known::new(purpose.clone(), record);
                        if owner.is_some() && known.assigned_at.is_none() {
                            known.assigned_at = Some(self.now());
                        }
                        known.fresh = true;
                        st.known.insert(id.clone(), known);
                        // Launched for a user who found nothing free: theirs from its first
                        // moment (the owner is in its launch tags), an assignment like any.
                        if let Some(user) = owner
                            .as_ref()
                            .filter(|_| instance.as_ref().is_some_and(|i| i.recorded))
                        {
                            audit::record(
                                Audit::Assign,
                                Some(user),
                                Some(&id),
                                Some(&purpose),
                                "launched",
                            );
                        }
                        // A user took over this launch while it ran: record them now.
                        if let Some(user) = instance.filter(|i| !i.recorded).and_then(|i| i.owner) {
                            st.recordings.insert(id.clone(), watch::channel(None).0);
                            tokio::spawn(Arc::clone(&self).record_owner(id.clone(), user));
                        }
                        Ok(id)
                    }
                    Err(e) => {
                        // Cannot happen while tickets are only completed here; never leak it.
                        error!("{e}; the orphan {id} is terminated by the next round");
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => {
                let in_doubt = matches!(e, ProviderError::Launch { in_doubt: true, .. });
                let mut st = self.lock();
                let st = &mut *st;
                let pool = st.pools.get_mut(&purpose).expect("a pool per purpose");
                if in_doubt {
                    // The instance may exist: it counts against the maximum until a listing
                    // shows it (by its client token) or it surely does not.
                    pool.launch_in_doubt(ticket);
                    st.doubts.insert(
                        token,
                        Doubt {
                            purpose: purpose.clone(),
                            ticket,
                            since_ms: self.now(),
                        },
                    );
                } else {
                    pool.launch_failed(ticket);
                    metrics()
                        .launch_failures
                        .with_label_values(&[&purpose, "refused"])
                        .inc();
                    audit::record(
                        Audit::LaunchFailure,
                        owner.as_ref(),
                        None,
                        Some(&purpose),
                        e.to_string(),
                    );
                }
                let breaker = st
                    .breakers
                    .get_mut(&purpose)
                    .expect("a breaker per purpose");
                note_failure(breaker, &purpose, &e.to_string(), self.now());
                Err(e.to_string())
            }
        };
        if let Some(tx) = self.lock().waits.remove(&(purpose.clone(), ticket)) {
            tx.send_replace(Some(outcome));
        }
        self.changed.notify_one();
    }

    // ---- The reconcile loop ----

    /// Rebuilds the pools from the provider: adopts every instance of a known purpose (with
    /// the owner in its tags) and terminates what cannot be adopted (I5).
    pub async fn recover(&self) -> Result<(), ProviderError> {
        let started = self.now();
        let records = self.provider.list().await?;
        {
            let mut st = self.lock();
            // Instances a predecessor launched just before it stopped may not be listed yet:
            // launch nothing until a listing taken after the provider's lag is in.
            st.own_launches_from = started + self.consistency.listing_lag.as_millis() as u64;
            st.synced_at = started;
        }
        self.adopt_unknown(records, true).await;
        self.recovered.send_replace(true);
        self.synced.send_modify(|n| *n += 1);
        info!(
            "pool rebuilt from the {} provider: {:?}",
            self.provider.kind(),
            self.census()
        );
        Ok(())
    }

    async fn adopt_unknown(&self, mut records: Vec<InstanceRecord>, at_start: bool) {
        // When two instances name one owner, the one assigned first is theirs; owned ones go
        // before free ones, which take only the room that is left.
        records.sort_by_key(|r| {
            let owned = r.tags.contains_key(TAG_USER);
            let since = r.time_tag(TAG_ASSIGNED_AT).unwrap_or(r.launched_at_ms);
            (!owned, since, r.id.clone())
        });
        let mut doomed = Vec::new();
        {
            let mut st = self.lock();
            let st = &mut *st;
            let now = self.now();
            st.tombstones
                .retain(|_, at| now.saturating_sub(*at) < TOMBSTONE_MS);
            for record in records {
                if st.known.contains_key(&record.id) || st.tombstones.contains_key(&record.id) {
                    continue;
                }
                // A launch of ours whose answer was lost: it is found, not in doubt any more.
                let doubt = record
                    .client_token
                    .as_ref()
                    .and_then(|token| st.doubts.remove(token));
                if let Some(doubt) = &doubt {
                    if let Some(pool) = st.pools.get_mut(&doubt.purpose) {
                        pool.doubt_resolved(doubt.ticket);
                    }
                    info!(
                        "{} is the instance of a launch whose answer was lost",
                        record.id
                    );
                } else if !at_start
                    && !unknown_is_settled(
                        record.launched_at_ms,
                        now,
                        st.own_launches_from,
                        self.grace,
                    )
                {
                    // It may be a launch of ours that has not answered yet.
                    continue;
                }
                let Some(purpose) = record
                    .purpose()
                    .filter(|p| st.pools.contains_key(*p))
                    .map(str::to_owned)
                else {
                    warn!(
                        "instance {} has no purpose this pool serves (tags {:?}); terminating it",
                        record.id, record.tags
                    );
                    doomed.push(record.id);
                    continue;
                };
                let owner = match record.owner() {
                    Ok(owner) => owner,
                    Err(e) => {
                        warn!("{e}; terminating it");
                        doomed.push(record.id);
                        continue;
                    }
                };
                let phase = match (record.state, &owner) {
                    (ProviderState::Pending | ProviderState::Running, _) => Phase::Launching,
                    // Someone's stopped instance holds their work: paused, for them.
                    (ProviderState::Stopped, Some(_)) => Phase::Paused,
                    _ => {
                        warn!(
                            "instance {} is {:?}; terminating it",
                            record.id, record.state
                        );
                        doomed.push(record.id);
                        continue;
                    }
                };
                let pool = st.pools.get_mut(&purpose).expect("checked above");
                match pool.adopt(record.id.clone(), owner.clone(), phase) {
                    Adoption::Adopted | Adoption::Known => {
                        if !at_start && doubt.is_none() {
                            warn!(
                                "adopted {} ({purpose}, owner {owner:?}) found at the provider",
                                record.id
                            );
                        }
                        let mut known = Known::new(purpose, record);
                        if owner.is_some() && known.assigned_at.is_none() {
                            // Owned but never stamped: count from its launch.
                            known.assigned_at = Some(known.record.launched_at_ms);
                        }
                        st.known.insert(known.record.id.clone(), known);
                    }
                    Adoption::Surplus => {
                        warn!(
                            "instance {} ({purpose}, owner {owner:?}) is surplus; terminating it",
                            record.id
                        );
                        doomed.push(record.id);
                    }
                }
            }
        }
        for id in doomed {
            match self.provider.terminate(&id).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => {
                    self.lock().tombstones.insert(id, self.now());
                }
                Err(e) => error!("cannot terminate {id}: {e}"),
            }
        }
    }

    /// One round: sync with the provider, probe launching instances, retire the ones that
    /// never got ready, retry failed terminations, top up.
    pub async fn reconcile(self: &Arc<Self>) {
        if self.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if !self.is_recovered() {
            if let Err(e) = self.recover().await {
                error!(
                    "cannot list instances at the {} provider: {e}; retrying",
                    self.provider.kind()
                );
                return;
            }
        }
        self.sync().await;
        self.probe_launching().await;
        self.reap_idle().await;
        self.top_up();
        self.accrue();
        self.save_books().await;
    }

    /// Terminates assigned instances whose user has been idle longer than the purpose's
    /// timeout (counted from the assignment, or from when the workspace became ready, when
    /// they never came), and saves the activity
    /// of the others in their tags now and then so that a restart keeps their deadlines.
    async fn reap_idle(&self) {
        let now = self.now();
        let mut idle = Vec::new();
        let mut to_save = Vec::new();
        {
            let st = self.lock();
            for (id, known) in &st.known {
                let Some(instance) = st.pools.get(&known.purpose).and_then(|p| p.instance(id))
                else {
                    continue;
                };
                // Only a ready workspace can see its user: one still starting is the
                // readiness timeout's.
                if instance.owner.is_none() || !instance.recorded || instance.phase != Phase::Ready
                {
                    continue;
                }
                let timeout = self.purposes[&known.purpose].idle_timeout.as_millis() as u64;
                let activity = known.activity.load(Ordering::Relaxed);
                let last = known.last_action();
                if now.saturating_sub(last) > timeout {
                    idle.push((id.clone(), now.saturating_sub(last)));
                } else if activity > known.saved_activity + save_interval(timeout) {
                    to_save.push((id.clone(), activity));
                }
            }
        }
        for (id, idle_ms) in idle {
            let on_idle = self
                .instance(&id)
                .map_or(OnIdle::Terminate, |v| self.purposes[&v.purpose].on_idle);
            let result = match on_idle {
                OnIdle::Terminate => {
                    info!(
                        "{id} has been idle for {} s; terminating it",
                        idle_ms / 1000
                    );
                    self.terminate(&id, End::Idle).await
                }
                OnIdle::Stop | OnIdle::Hibernate => {
                    info!(
                        "{id} has been idle for {} s; pausing it (its owner's work is kept)",
                        idle_ms / 1000
                    );
                    self.pause_for(&id, on_idle == OnIdle::Hibernate, "idle", idle_ms)
                        .await
                }
            };
            if let Err(e) = result {
                error!("cannot retire idle {id}: {e}");
            }
        }
        self.end_old_paused().await;
        for (id, activity) in to_save {
            let tags = [(TAG_LAST_ACTIVITY.to_owned(), activity.to_string())];
            match self.provider.set_tags(&id, &tags).await {
                Ok(()) => {
                    if let Some(known) = self.lock().known.get_mut(&id) {
                        known.saved_activity = activity;
                    }
                }
                Err(e) => warn!("cannot save the activity of {id}: {e}"),
            }
        }
    }

    /// Terminates paused instances past their purpose's lifetime, and the oldest of those
    /// over its cap of paused instances, saying whose they were.
    async fn end_old_paused(&self) {
        let now = self.now();
        let mut ends = Vec::new();
        {
            let st = self.lock();
            for (purpose, pool) in &st.pools {
                let spec = &self.purposes[purpose];
                let mut paused: Vec<(u64, InstanceId, Option<UserId>)> = pool
                    .instances()
                    .filter(|(_, i)| i.phase == Phase::Paused)
                    .map(|(id, i)| {
                        let at = st.known.get(id).and_then(|k| k.stopped_at).unwrap_or(now);
                        (at, id.clone(), i.owner.clone())
                    })
                    .collect();
                paused.sort();
                let ttl = spec.paused_ttl.as_millis() as u64;
                let expired = paused
                    .iter()
                    .take_while(|(at, ..)| now.saturating_sub(*at) > ttl)
                    .count();
                for (at, id, owner) in paused.drain(..expired) {
                    let hours = now.saturating_sub(at) / 3_600_000;
                    ends.push((
                        id,
                        owner,
                        format!("paused for {hours} h, past paused_ttl_hours"),
                    ));
                }
                let over = spec
                    .max_paused
                    .map_or(0, |cap| paused.len().saturating_sub(cap));
                for (_, id, owner) in paused.drain(..over) {
                    ends.push((
                        id,
                        owner,
                        "the oldest paused over max_paused_instances".into(),
                    ));
                }
            }
        }
        for (id, owner, why) in ends {
            warn!(
                "terminating paused {id} of {}: {why}",
                owner.as_ref().map_or("nobody", |u| u.as_str())
            );
            if let Err(e) = self.terminate(&id, End::PausedExpired).await {
                error!("cannot terminate paused {id}: {e}");
            }
        }
    }

    /// Forgets instances the provider no longer has; adopts or terminates instances it has
    /// that the pool does not know; tries terminations again.
    async fn sync(&self) {
        let started = self.now();
        let records = match self.provider.list().await {
            Ok(r) => r,
            Err(e) => {
                error!("cannot list instances: {e}");
                return;
            }
        };
        let listed: HashSet<InstanceId> = records.iter().map(|r| r.id.clone()).collect();
        // Refresh what the provider says of known instances: state, address, tags.
        let mut stopped = Vec::new();
        let mut restop = Vec::new();
        let mut missing = Vec::new();
        {
            let mut st = self.lock();
            let st = &mut *st;
            for record in &records {
                let Some(known) = st.known.get_mut(&record.id) else {
                    continue;
                };
                st.presence
                    .sighted(&record.id, Sighting::Live, started, self.grace);
                let moved =
                    known.record.address != record.address || known.record.state != record.state;
                known.record.state = record.state;
                known.record.address.clone_from(&record.address);
                known.record.key_name.clone_from(&record.key_name);
                for (k, v) in &record.tags {
                    known.record.tags.insert(k.clone(), v.clone());
                }
                if moved {
                    self.upstreams.invalidate(&record.id);
                }
                let phase = st
                    .pools
                    .get(&known.purpose)
                    .and_then(|p| p.instance(&record.id))
                    .map(|i| i.phase);
                match (record.state, phase) {
                    (ProviderState::Stopped, Some(Phase::Paused | Phase::Resuming)) => {}
                    (ProviderState::Stopped, _) => stopped.push(record.id.clone()),
                    // A stop that failed: try again.
                    (ProviderState::Running | ProviderState::Pending, Some(Phase::Paused)) => {
                        restop.push(record.id.clone())
                    }
                    _ => {}
                }
            }
            // An instance launched after the listing was taken cannot be in it.
            missing.extend(
                st.known
                    .iter()
                    .filter(|(id, k)| !listed.contains(*id) && k.record.launched_at_ms < started)
                    .map(|(id, _)| id.clone()),
            );
        }
        for id in stopped {
            // Someone's instance keeps their work: it is paused, theirs to resume.
            let owned = self
                .instance(&id)
                .is_some_and(|v| v.owner.is_some() && v.phase != Phase::Terminating);
            if owned {
                warn!("instance {id} was stopped outside the pool; it is paused for its owner");
                let _ = self.lock_pause(&id, false);
                continue;
            }
            warn!("instance {id} was stopped outside the pool; terminating it");
            if let Err(e) = self.terminate(&id, End::Orphan).await {
                error!("cannot terminate {id}: {e}");
            }
        }
        for id in restop {
            let hibernate = self
                .instance(&id)
                .is_some_and(|v| self.purposes[&v.purpose].on_idle == OnIdle::Hibernate);
            if let Err(e) = self.provider.stop(&id, hibernate).await {
                error!("stopping paused {id} failed again: {e}");
            }
        }
        self.take_in_missing(missing, started).await;
        let terminating: Vec<InstanceId> = {
            let st = self.lock();
            st.known
                .iter()
                .filter(|(id, k)| {
                    st.pools
                        .get(&k.purpose)
                        .and_then(|p| p.instance(id))
                        .is_some_and(|i| i.phase == Phase::Terminating)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in terminating {
            if let Err(e) = self.end(&id).await {
                error!("terminating {id} failed again: {e}");
            }
        }
        self.adopt_unknown(records, false).await;
        {
            let mut st = self.lock();
            let now = self.now();
            let unknown_ms = self.grace.unknown_ms;
            let expired: Vec<String> = st
                .doubts
                .iter()
                .filter(|(_, d)| now.saturating_sub(d.since_ms) >= unknown_ms)
                .map(|(token, _)| token.clone())
                .collect();
            for token in expired {
                if let Some(doubt) = st.doubts.remove(&token) {
                    info!(
                        "no instance turned up for a {} launch whose answer was lost",
                        doubt.purpose
                    );
                    if let Some(pool) = st.pools.get_mut(&doubt.purpose) {
                        pool.doubt_resolved(doubt.ticket);
                    }
                }
            }
            st.synced_at = st.synced_at.max(started);
        }
        self.synced.send_modify(|n| *n += 1);
    }

    /// Decides about known instances a listing taken at `started` did not show: gone when a
    /// lookup by id says so (or the provider's listings never lag), or once missing for the
    /// grace period; still there when the lookup finds them.
    async fn take_in_missing(&self, missing: Vec<InstanceId>, started: u64) {
        if missing.is_empty() {
            return;
        }
        let found: HashMap<InstanceId, ProviderState> = if self.grace.missing_ms == 0 {
            HashMap::new()
        } else {
            match self.provider.lookup(&missing).await {
                Ok(records) => records.into_iter().map(|r| (r.id, r.state)).collect(),
                Err(e) => {
                    warn!("cannot look up instances missing from the listing: {e}");
                    HashMap::new()
                }
            }
        };
        let vanished: Vec<InstanceId> = {
            let mut st = self.lock();
            missing
                .into_iter()
                .filter(|id| {
                    let sighting = match found.get(id) {
                        Some(ProviderState::Terminated) => Sighting::Gone,
                        Some(_) => Sighting::Live,
                        None if self.grace.missing_ms == 0 => Sighting::Gone,
                        None => Sighting::Missing,
                    };
                    st.presence.sighted(id, sighting, started, self.grace)
                })
                .collect()
        };
        for id in vanished {
            warn!("instance {id} is gone at the provider; forgetting it");
            let starting = self
                .instance(&id)
                .is_some_and(|v| v.phase == Phase::Launching);
            if starting {
                self.start_failed(
                    &id,
                    "the workspace stopped while it was starting".into(),
                    "exited",
                )
                .await;
            }
            self.forget(&id);
            self.changed.notify_one();
        }
    }

    async fn probe_launching(&self) {
        let launching: Vec<(InstanceId, Option<String>, String, u64)> = {
            let st = self.lock();
            st.known
                .iter()
                // Ready means the provider says running and the probe answers.
                .filter(|(id, k)| {
                    k.record.state == ProviderState::Running
                        && st
                            .pools
                            .get(&k.purpose)
                            .and_then(|p| p.instance(id))
                            .is_some_and(|i| matches!(i.phase, Phase::Launching | Phase::Resuming))
                })
                .map(|(id, k)| {
                    (
                        id.clone(),
                        k.record.address.clone(),
                        k.purpose.clone(),
                        k.starting_since,
                    )
                })
                .collect()
        };
        let probes = launching
            .into_iter()
            .map(|(id, address, purpose, launched_at)| async move {
                let spec = &self.purposes[&purpose];
                let path = spec.probe_path(id.as_str());
                let ready = match (self.provider.answers(&id), &address) {
                    (Some(answers), _) => answers,
                    (None, Some(a)) => {
                        probe(
                            a,
                            &path,
                            &spec.readiness_user_agent,
                            spec.readiness_status,
                            Duration::from_secs(2),
                        )
                        .await
                    }
                    (None, None) => false,
                };
                (id, purpose, launched_at, ready)
            });
        let results = futures_util::future::join_all(probes).await;
        let now = self.now();
        for (id, purpose, launched_at, ready) in results {
            if ready {
                let mut st = self.lock();
                if let Some(pool) = st.pools.get_mut(&purpose) {
                    let _ = pool.mark_ready(&id);
                }
                // The user could not act before now: their idle clock starts here.
                if let Some(known) = st.known.get(&id).filter(|k| k.fresh) {
                    known.activity.fetch_max(now, Ordering::Relaxed);
                    let took = now.saturating_sub(launched_at);
                    metrics()
                        .launch_to_ready_seconds
                        .with_label_values(&[&purpose])
                        .observe(took as f64 / 1000.0);
                    let times = st.ready_times.entry(purpose.clone()).or_default();
                    if times.len() == READY_TIMES_KEPT {
                        times.pop_front();
                    }
                    times.push_back(took);
                }
                if let Some(breaker) = st.breakers.get_mut(&purpose) {
                    if breaker.is_open() {
                        info!("{purpose}: {id} is ready; launches resume");
                    }
                    breaker.succeeded();
                }
                drop(st);
                self.upstreams.invalidate(&id);
                self.readiness.send_modify(|n| *n += 1);
                info!("{id} ({purpose}) is ready");
            } else if now.saturating_sub(launched_at) > self.ready_timeout.as_millis() as u64
                && self
                    .instance(&id)
                    .is_some_and(|v| v.phase == Phase::Resuming)
            {
                // A resume that never answers leaves the work where it was: paused again.
                warn!(
                    "{id} ({purpose}) did not answer within {:?} of its resume; pausing it again",
                    self.ready_timeout
                );
                let hibernate = self.purposes[&purpose].on_idle == OnIdle::Hibernate;
                if let Err(e) = self.pause(&id, hibernate).await {
                    error!("cannot pause {id} again: {e}");
                }
            } else if now.saturating_sub(launched_at) > self.ready_timeout.as_millis() as u64 {
                warn!(
                    "{id} ({purpose}) was not ready within {:?}; replacing it",
                    self.ready_timeout
                );
                self.start_failed(
                    &id,
                    format!(
                        "the workspace did not answer within {} s of its launch",
                        self.ready_timeout.as_secs()
                    ),
                    "timeout",
                )
                .await;
                if let Err(e) = self.terminate(&id, End::FailedStart).await {
                    error!("cannot terminate {id}: {e}");
                }
            }
        }
    }

    fn top_up(self: &Arc<Self>) {
        let now = self.now();
        let mut launches = Vec::new();
        let mut retired = Vec::new();
        {
            let mut st = self.lock();
            if !st.caught_up() {
                return;
            }
            let st = &mut *st;
            for (purpose, pool) in st.pools.iter_mut() {
                let target = self.warm_target(purpose, now, &mut st.history, &st.ready_times);
                pool.set_min_free(target);
                for id in pool.surplus() {
                    // Only once it has been up a while: a target that dips for a round
                    // does not cost a boot.
                    let min_age = self.purposes[purpose].scale_down_after.as_millis() as u64;
                    let old_enough = st
                        .known
                        .get(&id)
                        .is_some_and(|k| now.saturating_sub(k.starting_since) >= min_age);
                    if old_enough && pool.release(&id).is_ok() {
                        metrics()
                            .terminations
                            .with_label_values(&[purpose, End::Surplus.label()])
                            .inc();
                        audit::record(
                            End::Surplus.audit(),
                            None,
                            Some(&id),
                            Some(purpose),
                            End::Surplus.label(),
                        );
                        retired.push(id);
                    }
                }
                let breaker = st.breakers.get_mut(purpose).expect("a breaker per purpose");
                for ticket in pool.top_up() {
                    match breaker.permit(now, false) {
                        Ok(permit) => {
                            if permit == Permit::Probe {
                                info!("{purpose}: trying one launch after the pause");
                            }
                            st.waits
                                .insert((purpose.clone(), ticket), watch::channel(None).0);
                            launches.push((purpose.clone(), ticket));
                        }
                        Err(_) => {
                            pool.launch_failed(ticket);
                        }
                    }
                }
            }
        }
        for (purpose, ticket) in launches {
            tokio::spawn(Arc::clone(self).launch(purpose, ticket, true));
        }
        for id in retired {
            info!("{id} is free beyond the warm policy's target; terminating it");
            self.upstreams.invalidate(&id);
            let this = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = this.end(&id).await {
                    error!("cannot terminate surplus {id}: {e}");
                }
            });
        }
    }

    /// Runs [`Self::reconcile`] every `interval`, and early after a change, until `shutdown`.
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.changed.notified() => {
                    // A burst of assignments wakes the loop once per round, not once each.
                    tokio::time::sleep(MIN_ROUND_GAP.min(interval)).await;
                }
                _ = shutdown.changed() => {
                    info!("pool manager stops; instances keep running and are re-adopted at the next start");
                    return;
                }
            }
        }
    }
}

/// Counts a failed start against a purpose's launches, and says so in the log when launching
/// stops.
fn note_failure(breaker: &mut Breaker, purpose: &str, reason: &str, now: u64) {
    match breaker.failed(now, reason) {
        AfterFailure::Opened { until_ms } => error!(
            "{purpose}: launches paused for {} s after failed starts in a row; last: {reason}",
            until_ms.saturating_sub(now).div_ceil(1000)
        ),
        AfterFailure::Backoff { until_ms } => warn!(
            "{purpose}: a start failed ({reason}); next warm-up launch in {} ms",
            until_ms.saturating_sub(now)
        ),
    }
}

/// Why launches of `purpose` are refused, in words for a caller.
fn paused_message(purpose: &str, refusal: &Refusal, now: u64) -> String {
    match refusal {
        Refusal::Paused {
            until_ms,
            failures,
            reason,
            probing,
        } => {
            let when = if *probing {
                "a trial launch is under way".to_owned()
            } else {
                format!(
                    "the pool tries again in {} s",
                    until_ms.saturating_sub(now).div_ceil(1000)
                )
            };
            format!("launching `{purpose}` instances is paused after {failures} failed starts in a row (last: {reason}); {when}, on its own. Ask again later; an operator finds the cause in the pool's log")
        }
        Refusal::Backoff { .. } => {
            format!("launching `{purpose}` instances is backing off after a failed start; ask again in a few seconds")
        }
    }
}

/// How stale the saved activity may get: a tenth of the idle timeout, between 1 s and 60 s.
/// After a restart an instance may be culled up to this much early.
fn save_interval(timeout_ms: u64) -> u64 {
    (timeout_ms / 10).clamp(1000, 60_000)
}

/// Takes the exclusive lock on `STATE_DIR/<pool>.lock`, waiting up to `wait` for a process
/// that holds it (the old version during a graceful upgrade, which gives it up when it hands
/// over). Two rstudio-pools running one pool would both assign the same instances: the second
/// is refused with the holder's process id. Pools of other names may share the folder.
pub fn lock_state(
    state_dir: &std::path::Path,
    pool: &str,
    wait: Duration,
) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    let path = state_dir.join(format!("{pool}.lock"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let until = std::time::Instant::now() + wait;
    // SAFETY: flock on a descriptor this function owns.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() >= until {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(format!(
                "another rstudio-pool (pid {}) runs pool `{pool}` on {}: stop it first, or take over from it with -u",
                holder.trim(),
                state_dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_fit_ec2_whatever_the_pool_name() {
        let a = client_token();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, client_token());
    }

    #[test]
    fn a_paused_purpose_says_why_and_when() {
        let message = paused_message(
            "rstudio",
            &Refusal::Paused {
                until_ms: 1_000_030_000,
                failures: 3,
                reason: "InvalidAMIID.NotFound".into(),
                probing: false,
            },
            1_000_000_000,
        );
        assert!(
            message.contains("paused after 3 failed starts"),
            "{message}"
        );
        assert!(message.contains("InvalidAMIID.NotFound"), "{message}");
        assert!(message.contains("tries again in 30 s"), "{message}");
    }
}
