//! The pool manager: carries out the pure pool's decisions with a provider. It answers the
//! commands (request, status, delete), and its reconcile loop keeps the pools topped up,
//! probes launching instances, retires those that never get ready, and keeps the pool in step
//! with the provider, the source of truth (I5).
//!
//! Locking: one `std::sync::Mutex` over all pools, never held across an `await`. Provider
//! calls happen outside it; their outcomes are fed back into the pools under it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, info, warn};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use super::links::UserLinks;
use super::probe::probe;
use crate::config::Purpose;
use crate::core::ids::{InstanceId, UserId};
use crate::core::pool::{Adoption, Census, Grant, Phase, Pool, PoolError, Ticket};
use crate::provider::process::now_ms;
use crate::provider::{
    InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState, TAG_ASSIGNED_AT,
    TAG_LAST_ACTIVITY, TAG_USER,
};

/// How long a caller waits for a launch someone else started for the same user.
const PENDING_WAIT: Duration = Duration::from_secs(120);
/// Listings in a row that must miss an instance before the pool believes it is gone.
const MISSES_BEFORE_GONE: u32 = 3;
/// Warm-up launches at once: enough to fill a pool quickly, few enough to leave the CPU to
/// requests (a local launch is a fork and an exec; an EC2 one is paced by its own bucket).
const WARMUPS_AT_ONCE: usize = 4;
/// The least time between two rounds woken by changes.
const MIN_ROUND_GAP: Duration = Duration::from_millis(100);
/// How long a terminated instance is not adopted back from a listing.
const TOMBSTONE_MS: u64 = 10 * 60 * 1000;
/// How long a command waits for the pool to be rebuilt from the provider after a start.
const RECOVERY_WAIT: Duration = Duration::from_secs(20);

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
    #[error(
        "the pool is still being rebuilt from the provider after a start; retry in a few seconds"
    )]
    Recovering,
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
    /// `launching` or `ready`.
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
}

impl Known {
    fn new(purpose: String, record: InstanceRecord) -> Self {
        let assigned_at = record.time_tag(TAG_ASSIGNED_AT);
        let saved_activity = record.time_tag(TAG_LAST_ACTIVITY).unwrap_or(0);
        Self {
            purpose,
            record,
            assigned_at,
            activity: Arc::new(AtomicU64::new(saved_activity)),
            saved_activity,
        }
    }
}

/// The tags that make `user` the owner of an instance, assigned at `now`.
fn owner_tags(user: &UserId, now: u64) -> Vec<(String, String)> {
    vec![
        (TAG_USER.to_owned(), user.as_str().to_owned()),
        (TAG_ASSIGNED_AT.to_owned(), now.to_string()),
    ]
}

struct State {
    pools: BTreeMap<String, Pool>,
    known: HashMap<InstanceId, Known>,
    /// Outcome channels of pending launches, for callers waiting on someone else's launch.
    waits: HashMap<(String, Ticket), watch::Sender<Option<LaunchOutcome>>>,
    /// Consecutive failed launches per purpose, for backoff.
    failures: HashMap<String, u32>,
    /// No top-up launch of a purpose before this time (ms since the epoch).
    backoff_until: HashMap<String, u64>,
    /// Consecutive listings that did not show a known instance. Listings are eventually
    /// consistent (EC2's are, and a folder read while it changes can skip entries), so an
    /// instance is forgotten only after several misses in a row.
    misses: HashMap<InstanceId, u32>,
    /// Instances we terminated, with when: a listing taken just before a termination still
    /// shows them, and they must not be adopted back.
    tombstones: HashMap<InstanceId, u64>,
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
    state: Mutex<State>,
    /// Wakes the reconcile loop early (after an assignment or a termination).
    changed: Notify,
    /// True once the pools were rebuilt from the provider after start.
    recovered: watch::Sender<bool>,
    /// Warm-up launches under way at once, at most.
    warmups: tokio::sync::Semaphore,
    /// Provider launches under way; the loop does not adopt unknown instances meanwhile, since
    /// one of them may be a launch whose result has not been recorded yet.
    launches_in_flight: AtomicUsize,
}

impl PoolManager {
    pub fn new(
        provider: Arc<dyn Provider>,
        purposes: BTreeMap<String, Purpose>,
        links: UserLinks,
        ready_timeout: Duration,
    ) -> Arc<Self> {
        let pools = purposes
            .iter()
            .map(|(name, p)| (name.clone(), Pool::new(p.limits)))
            .collect();
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
            state: Mutex::new(State {
                pools,
                known: HashMap::new(),
                waits: HashMap::new(),
                failures: HashMap::new(),
                backoff_until: HashMap::new(),
                misses: HashMap::new(),
                tombstones: HashMap::new(),
            }),
            changed: Notify::new(),
            recovered: watch::channel(false).0,
            launches_in_flight: AtomicUsize::new(0),
            warmups: tokio::sync::Semaphore::new(WARMUPS_AT_ONCE),
        })
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

    async fn wait_recovered(&self) -> Result<(), ManagerError> {
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
    /// hold none. Returns at once; the answer says whether the instance is ready yet.
    pub async fn request(&self, user: &UserId, purpose: &str) -> Result<Assignment, ManagerError> {
        self.purpose(purpose)?;
        self.wait_recovered().await?;
        let grant = {
            let mut st = self.lock();
            let grant = st
                .pools
                .get_mut(purpose)
                .expect("a pool per configured purpose")
                .request(user)?;
            if let Grant::Launch(ticket) = grant {
                st.waits
                    .insert((purpose.to_owned(), ticket), watch::channel(None).0);
            }
            grant
        };
        let id = match grant {
            Grant::Held(id) => id,
            Grant::Assigned(id) => {
                let now = now_ms();
                if let Some(known) = self.lock().known.get_mut(&id) {
                    known.assigned_at = Some(now);
                }
                self.upstreams.invalidate(&id);
                if let Err(e) = self.provider.set_tags(&id, &owner_tags(user, now)).await {
                    // Without the tag a restart would see a free instance: never keep it.
                    error!("cannot record {user} as the owner of {id}: {e}; terminating it");
                    let _ = self.terminate(&id).await;
                    return Err(e.into());
                }
                info!("assigned {id} ({purpose}) to {user}");
                self.changed.notify_one();
                id
            }
            Grant::Launch(ticket) => self
                .launch(purpose, ticket, Some(user.clone()))
                .await
                .map_err(ManagerError::LaunchFailed)?,
            Grant::Pending(ticket) => self.wait_for_launch(purpose, ticket).await?,
        };
        Ok(self.assignment(&id, user, purpose))
    }

    async fn wait_for_launch(
        &self,
        purpose: &str,
        ticket: Ticket,
    ) -> Result<InstanceId, ManagerError> {
        let rx = self
            .lock()
            .waits
            .get(&(purpose.to_owned(), ticket))
            .map(|tx| tx.subscribe());
        let Some(mut rx) = rx else {
            return Err(ManagerError::LaunchFailed(
                "the launch finished while this request arrived; send the request again".into(),
            ));
        };
        let outcome = match tokio::time::timeout(PENDING_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone(),
            _ => None,
        };
        match outcome {
            Some(Ok(id)) => Ok(id),
            Some(Err(reason)) => Err(ManagerError::LaunchFailed(reason)),
            None => Err(ManagerError::LaunchFailed(
                "the launch did not finish in time; send the request again".into(),
            )),
        }
    }

    fn assignment(&self, id: &InstanceId, user: &UserId, purpose: &str) -> Assignment {
        let ready = self
            .lock()
            .pools
            .get(purpose)
            .and_then(|p| p.instance(id))
            .is_some_and(|i| i.phase == Phase::Ready);
        Assignment {
            instance_id: id.clone(),
            user_id: user.as_str().to_owned(),
            purpose: purpose.to_owned(),
            status: if ready { "ready" } else { "launching" },
            ready,
            url: self.links.for_user(id, user, now_ms()),
        }
    }

    /// A link for `user` to open `id` (with a fresh token in token mode).
    pub fn user_link(&self, id: &InstanceId, user: &UserId) -> String {
        self.links.for_user(id, user, now_ms())
    }

    /// The workspace's address through the proxy, without credentials.
    pub fn user_url(&self, id: &InstanceId) -> String {
        self.links.base(id)
    }

    /// `GET_STATUS {}`: ids of the instances assigned to users, every purpose, sorted.
    pub fn assigned(&self) -> Vec<InstanceId> {
        let st = self.lock();
        let mut ids: Vec<InstanceId> = st
            .pools
            .values()
            .flat_map(|p| {
                p.instances()
                    .filter(|(_, i)| i.owner.is_some() && i.phase != Phase::Terminating)
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
                owner: instance.owner.clone(),
                ready: instance.phase == Phase::Ready,
                stage: match (instance.phase, known.record.state) {
                    (Phase::Ready, _) => Stage::Ready,
                    (_, ProviderState::Running) => Stage::Starting,
                    _ => Stage::Launching,
                },
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

    fn record_failure(&self, id: &InstanceId, reason: String) {
        let (owner, purpose) = {
            let st = self.lock();
            let Some(known) = st.known.get(id) else {
                return;
            };
            let owner = st
                .pools
                .get(&known.purpose)
                .and_then(|p| p.instance(id))
                .and_then(|i| i.owner.clone());
            (owner, known.purpose.clone())
        };
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
                Some(Phase::Launching) => {}
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

    /// `DELETE`: terminates the instance; the pool tops up afterwards.
    pub async fn delete(&self, id: &InstanceId) -> Result<(), ManagerError> {
        self.wait_recovered().await?;
        self.terminate(id).await
    }

    /// Releases `id` in its pool and terminates it at the provider. On a provider failure the
    /// instance stays `Terminating` (never handed out) and the reconcile loop retries.
    pub async fn terminate(&self, id: &InstanceId) -> Result<(), ManagerError> {
        {
            let mut st = self.lock();
            let purpose = st
                .known
                .get(id)
                .map(|k| k.purpose.clone())
                .ok_or_else(|| PoolError::UnknownInstance(id.clone()))?;
            if let Some(pool) = st.pools.get_mut(&purpose) {
                pool.release(id)?;
            }
        }
        // From here on the proxy answers 404 for it: never the old upstream.
        self.upstreams.invalidate(id);
        self.provider.terminate(id).await?;
        self.bury(id);
        self.changed.notify_one();
        Ok(())
    }

    /// Forgets an instance we terminated, and remembers that we did.
    fn bury(&self, id: &InstanceId) {
        self.forget(id);
        self.lock().tombstones.insert(id.clone(), now_ms());
    }

    fn forget(&self, id: &InstanceId) {
        self.upstreams.invalidate(id);
        let mut st = self.lock();
        if let Some(known) = st.known.remove(id) {
            if let Some(pool) = st.pools.get_mut(&known.purpose) {
                pool.forget(id);
            }
        }
    }

    // ---- Launching ----

    /// Launches the instance of `ticket` and records the outcome. Returns the id, or the reason
    /// it failed in words for the caller.
    async fn launch(
        &self,
        purpose: &str,
        ticket: Ticket,
        owner: Option<UserId>,
    ) -> Result<InstanceId, String> {
        self.launches_in_flight.fetch_add(1, Ordering::SeqCst);
        let spec = LaunchSpec {
            purpose: purpose.to_owned(),
            tags: owner
                .as_ref()
                .map(|user| owner_tags(user, now_ms()))
                .unwrap_or_default(),
        };
        let result = self.provider.launch(&spec).await;
        let outcome = match result {
            Ok(record) => {
                let id = record.id.clone();
                let late_owner = {
                    let mut st = self.lock();
                    st.failures.remove(purpose);
                    let pool = st.pools.get_mut(purpose).expect("a pool per purpose");
                    match pool.launched(ticket, id.clone()) {
                        Ok(()) => {
                            let now_owner = pool.instance(&id).and_then(|i| i.owner.clone());
                            let mut known = Known::new(purpose.to_owned(), record);
                            if now_owner.is_some() && known.assigned_at.is_none() {
                                known.assigned_at = Some(now_ms());
                            }
                            st.known.insert(id.clone(), known);
                            // A user took over this launch while it ran: tag them now.
                            Ok(now_owner.filter(|_| owner.is_none()))
                        }
                        Err(e) => Err(e),
                    }
                };
                match late_owner {
                    Ok(Some(user)) => {
                        match self
                            .provider
                            .set_tags(&id, &owner_tags(&user, now_ms()))
                            .await
                        {
                            Ok(()) => Ok(id),
                            Err(e) => {
                                error!("cannot record {user} as the owner of {id}: {e}; terminating it");
                                let _ = self.terminate(&id).await;
                                Err(format!(
                                    "could not record the owner of the new instance: {e}"
                                ))
                            }
                        }
                    }
                    Ok(None) => Ok(id),
                    Err(e) => {
                        // Cannot happen while tickets are only completed here; never leak it.
                        error!("{e}; terminating the orphan {id}");
                        let _ = self.provider.terminate(&id).await;
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => {
                let mut st = self.lock();
                st.pools
                    .get_mut(purpose)
                    .expect("a pool per purpose")
                    .launch_failed(ticket);
                let failures = {
                    let count = st.failures.entry(purpose.to_owned()).or_insert(0);
                    *count += 1;
                    *count
                };
                let delay = backoff(failures);
                st.backoff_until
                    .insert(purpose.to_owned(), now_ms() + delay.as_millis() as u64);
                error!("{e} (attempt {failures}; next top-up in {delay:?})");
                Err(e.to_string())
            }
        };
        self.launches_in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(tx) = self.lock().waits.remove(&(purpose.to_owned(), ticket)) {
            tx.send_replace(Some(outcome.clone()));
        }
        self.changed.notify_one();
        outcome
    }

    // ---- The reconcile loop ----

    /// Rebuilds the pools from the provider: adopts every instance of a known purpose (with
    /// the owner in its tags) and terminates what cannot be adopted (I5).
    pub async fn recover(&self) -> Result<(), ProviderError> {
        let records = self.provider.list().await?;
        self.adopt_unknown(records, true).await;
        self.recovered.send_replace(true);
        info!(
            "pool rebuilt from the {} provider: {:?}",
            self.provider.kind(),
            self.census()
        );
        Ok(())
    }

    async fn adopt_unknown(&self, records: Vec<InstanceRecord>, at_start: bool) {
        let mut doomed = Vec::new();
        {
            let mut st = self.lock();
            let now = now_ms();
            st.tombstones
                .retain(|_, at| now.saturating_sub(*at) < TOMBSTONE_MS);
            for record in records {
                if st.known.contains_key(&record.id) || st.tombstones.contains_key(&record.id) {
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
                if record.state == ProviderState::Stopped {
                    warn!("instance {} is stopped; terminating it", record.id);
                    doomed.push(record.id);
                    continue;
                }
                let pool = st.pools.get_mut(&purpose).expect("checked above");
                match pool.adopt(record.id.clone(), owner.clone(), Phase::Launching) {
                    Adoption::Adopted | Adoption::Known => {
                        if !at_start {
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
                Ok(()) => {
                    self.lock().tombstones.insert(id, now_ms());
                }
                Err(e) => error!("cannot terminate {id}: {e}"),
            }
        }
    }

    /// One round: sync with the provider, probe launching instances, retire the ones that
    /// never got ready, retry failed terminations, top up.
    pub async fn reconcile(self: &Arc<Self>) {
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
    }

    /// Terminates assigned instances whose user has been idle longer than the purpose's
    /// timeout (counted from the assignment when they never came), and saves the activity
    /// of the others in their tags now and then so that a restart keeps their deadlines.
    async fn reap_idle(&self) {
        let now = now_ms();
        let mut idle = Vec::new();
        let mut to_save = Vec::new();
        {
            let st = self.lock();
            for (id, known) in &st.known {
                let Some(instance) = st.pools.get(&known.purpose).and_then(|p| p.instance(id))
                else {
                    continue;
                };
                if instance.owner.is_none() || instance.phase == Phase::Terminating {
                    continue;
                }
                let timeout = self.purposes[&known.purpose].idle_timeout.as_millis() as u64;
                let activity = known.activity.load(Ordering::Relaxed);
                let last = activity.max(known.assigned_at.unwrap_or(known.record.launched_at_ms));
                if now.saturating_sub(last) > timeout {
                    idle.push((id.clone(), now.saturating_sub(last)));
                } else if activity > known.saved_activity + save_interval(timeout) {
                    to_save.push((id.clone(), activity));
                }
            }
        }
        for (id, idle_ms) in idle {
            info!(
                "{id} has been idle for {} s; terminating it",
                idle_ms / 1000
            );
            if let Err(e) = self.terminate(&id).await {
                error!("cannot terminate idle {id}: {e}");
            }
        }
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

    /// Forgets instances the provider no longer has; adopts or terminates instances it has
    /// that the pool does not know; retries terminations.
    async fn sync(&self) {
        let started = now_ms();
        let in_flight_before = self.launches_in_flight.load(Ordering::SeqCst);
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
        {
            let mut st = self.lock();
            for record in &records {
                let Some(known) = st.known.get_mut(&record.id) else {
                    continue;
                };
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
                if record.state == ProviderState::Stopped {
                    stopped.push(record.id.clone());
                }
            }
        }
        for id in stopped {
            warn!("instance {id} was stopped outside the pool; terminating it");
            if let Err(e) = self.terminate(&id).await {
                error!("cannot terminate {id}: {e}");
            }
        }
        let mut retry_terminate = Vec::new();
        {
            let st = self.lock();
            for (id, known) in &st.known {
                let phase = st
                    .pools
                    .get(&known.purpose)
                    .and_then(|p| p.instance(id))
                    .map(|i| i.phase);
                if listed.contains(id) && phase == Some(Phase::Terminating) {
                    retry_terminate.push(id.clone());
                }
            }
        }
        let vanished: Vec<InstanceId> = {
            let mut st = self.lock();
            let candidates: Vec<InstanceId> = st
                .known
                .iter()
                .filter(|(id, k)| !listed.contains(*id) && k.record.launched_at_ms < started)
                .map(|(id, _)| id.clone())
                .collect();
            st.misses.retain(|id, _| candidates.contains(id));
            let mut gone = Vec::new();
            for id in candidates {
                let misses = st.misses.entry(id.clone()).or_insert(0);
                *misses += 1;
                if *misses >= MISSES_BEFORE_GONE {
                    st.misses.remove(&id);
                    gone.push(id);
                }
            }
            gone
        };
        for id in vanished {
            warn!("instance {id} is gone at the provider; forgetting it");
            let starting = self
                .instance(&id)
                .is_some_and(|v| v.phase == Phase::Launching);
            if starting {
                self.record_failure(&id, "the workspace stopped while it was starting".into());
            }
            self.forget(&id);
            self.changed.notify_one();
        }
        for id in retry_terminate {
            if let Err(e) = self.provider.terminate(&id).await {
                error!("terminating {id} failed again: {e}");
            } else {
                self.bury(&id);
            }
        }
        if in_flight_before == 0 && self.launches_in_flight.load(Ordering::SeqCst) == 0 {
            self.adopt_unknown(records, false).await;
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
                            .is_some_and(|i| i.phase == Phase::Launching)
                })
                .map(|(id, k)| {
                    (
                        id.clone(),
                        k.record.address.clone(),
                        k.purpose.clone(),
                        k.record.launched_at_ms,
                    )
                })
                .collect()
        };
        let probes = launching
            .into_iter()
            .map(|(id, address, purpose, launched_at)| async move {
                let spec = &self.purposes[&purpose];
                let path = spec.probe_path(id.as_str());
                let ready = match &address {
                    Some(a) => {
                        probe(
                            a,
                            &path,
                            &spec.readiness_user_agent,
                            spec.readiness_status,
                            Duration::from_secs(2),
                        )
                        .await
                    }
                    None => false,
                };
                (id, purpose, launched_at, ready)
            });
        let results = futures_util::future::join_all(probes).await;
        let now = now_ms();
        for (id, purpose, launched_at, ready) in results {
            if ready {
                let mut st = self.lock();
                if let Some(pool) = st.pools.get_mut(&purpose) {
                    let _ = pool.mark_ready(&id);
                }
                drop(st);
                self.upstreams.invalidate(&id);
                self.readiness.send_modify(|n| *n += 1);
                info!("{id} ({purpose}) is ready");
            } else if now.saturating_sub(launched_at) > self.ready_timeout.as_millis() as u64 {
                warn!(
                    "{id} ({purpose}) was not ready within {:?}; replacing it",
                    self.ready_timeout
                );
                self.record_failure(
                    &id,
                    format!(
                        "the workspace did not answer within {} s of its launch",
                        self.ready_timeout.as_secs()
                    ),
                );
                {
                    let mut st = self.lock();
                    let failures = {
                        let count = st.failures.entry(purpose.clone()).or_insert(0);
                        *count += 1;
                        *count
                    };
                    let until = now + backoff(failures).as_millis() as u64;
                    st.backoff_until.insert(purpose.clone(), until);
                }
                if let Err(e) = self.terminate(&id).await {
                    error!("cannot terminate {id}: {e}");
                }
            }
        }
    }

    fn top_up(self: &Arc<Self>) {
        let now = now_ms();
        let mut launches = Vec::new();
        {
            let mut st = self.lock();
            let purposes: Vec<String> = st.pools.keys().cloned().collect();
            for purpose in purposes {
                if st.backoff_until.get(&purpose).is_some_and(|&t| t > now) {
                    continue;
                }
                let tickets = st.pools.get_mut(&purpose).expect("listed").top_up();
                for ticket in tickets {
                    st.waits
                        .insert((purpose.clone(), ticket), watch::channel(None).0);
                    launches.push((purpose.clone(), ticket));
                }
            }
        }
        for (purpose, ticket) in launches {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                // Warm-ups take turns, so that topping up a big pool does not starve the
                // command API and the proxy of CPU; a user's own launch never waits here.
                let _turn = this.warmups.acquire().await;
                let _ = this.launch(&purpose, ticket, None).await;
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

/// How stale the saved activity may get: a tenth of the idle timeout, between 1 s and 60 s.
/// After a restart an instance may be culled up to this much early.
fn save_interval(timeout_ms: u64) -> u64 {
    (timeout_ms / 10).clamp(1000, 60_000)
}

/// Exponential backoff with jitter for failed launches: 1 s, 2 s, 4 s ... up to 5 minutes.
fn backoff(failures: u32) -> Duration {
    let base = 1000u64
        .saturating_mul(1 << failures.saturating_sub(1).min(9))
        .min(300_000);
    let jitter = rand::random::<u64>() % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_secs(1) && backoff(1) < Duration::from_secs(2));
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(40) <= Duration::from_millis(375_000));
    }
}
