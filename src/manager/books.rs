//! What the pool costs and what it has seen: the books (instance-seconds and money by purpose
//! and state, per day and per user) and the arrival history of the `forecast` warm policy,
//! both saved in `STATE_DIR/<pool>.books.json` every reconcile round, so that a restart (even
//! a SIGKILL) loses at most one round.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Known, PoolManager, ACTIVE_WINDOW_MS, ASSUMED_READY_MS, DEFAULT_ALPHA};
use crate::core::ids::InstanceId;
use crate::core::ledger::{format_time, Entry, Ledger, Tally, Use};
use crate::core::pool::Phase;
use crate::core::warm::{self, History, Inputs, WarmPolicy};
use crate::metrics::metrics;

/// The file, as saved.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    ledger: Ledger,
    #[serde(default)]
    history: HashMap<String, History>,
    /// What each instance was doing at the save.
    #[serde(default)]
    entries: Vec<(String, Entry)>,
}

impl PoolManager {
    /// Keeps the books in `STATE_DIR/<pool>.books.json`: reads what a predecessor saved (the
    /// time since its last save is put on the instances it left, once the pool is rebuilt),
    /// and saves every round from now on. Without a saved file the books open now.
    pub fn keep_books(&self, state_dir: &Path, pool_name: &str) {
        let path = state_dir.join(format!("{pool_name}.books.json"));
        let now = self.now();
        let saved = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => Some(saved),
                Err(e) => {
                    // Kept aside, never overwritten: an operator may want the figures.
                    let aside = path.with_extension(format!("json.unreadable-{now}"));
                    warn!(
                        "cannot read the pool's books {}: {e}; moved to {} and opened new books",
                        path.display(),
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!("cannot read the pool's books {}: {e}", path.display());
                None
            }
        };
        {
            let mut st = self.lock();
            match saved {
                Some(saved) => {
                    info!(
                        "the pool's books since {} are read back from {}",
                        format_time(saved.ledger.since_ms),
                        path.display()
                    );
                    st.ledger = saved.ledger;
                    st.history = saved.history;
                    st.restored = Some(
                        saved
                            .entries
                            .into_iter()
                            .filter_map(|(id, e)| Some((InstanceId::parse(&id).ok()?, e)))
                            .collect(),
                    );
                }
                None => st.ledger = Ledger::open(now),
            }
        }
        *self.books.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// A copy of the books.
    pub fn ledger(&self) -> Ledger {
        self.lock().ledger.clone()
    }

    /// Opens books in memory only (the simulator's), or opens them again from now.
    pub fn open_books(&self) {
        let now = self.now();
        self.lock().ledger = Ledger::open(now);
    }

    /// Saves the books, written beside and renamed so that a crash leaves the old or the new.
    pub(super) async fn save_books(&self) {
        let Some(path) = self.books.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        if !self.is_recovered() {
            // Until the pool is rebuilt, what was read is still the truth.
            return;
        }
        let bytes = {
            let st = self.lock();
            let saved = Saved {
                ledger: st.ledger.clone(),
                history: st.history.clone(),
                entries: self
                    .entries(&st, self.now())
                    .into_iter()
                    .map(|(id, e)| (id.to_string(), e))
                    .collect(),
            };
            serde_json::to_vec(&saved)
        };
        let Ok(bytes) = bytes else { return };
        // Off the runtime's threads; awaited, so that two rounds never write at once.
        let written = tokio::task::spawn_blocking({
            let path = path.clone();
            move || write_beside(&path, &bytes)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        if let Err(e) = written {
            warn!("cannot save the pool's books to {}: {e}", path.display());
        }
    }

    /// What each instance is doing now, for the books.
    fn entries(&self, st: &super::State, now: u64) -> Vec<(InstanceId, Entry)> {
        let mut out = Vec::new();
        for (purpose, pool) in &st.pools {
            for (id, instance) in pool.instances() {
                let state = match instance.phase {
                    Phase::Launching | Phase::Resuming => Use::Launching,
                    Phase::Paused => Use::Paused,
                    Phase::Terminating => continue,
                    Phase::Ready if instance.owner.is_none() => Use::Free,
                    Phase::Ready => {
                        let last = st.known.get(id).map_or(0, Known::last_action);
                        if now.saturating_sub(last) <= ACTIVE_WINDOW_MS {
                            Use::AssignedActive
                        } else {
                            Use::AssignedIdle
                        }
                    }
                };
                out.push((
                    id.clone(),
                    Entry {
                        purpose: purpose.clone(),
                        state,
                        user: instance.owner.as_ref().map(|u| u.as_str().to_owned()),
                    },
                ));
            }
        }
        out
    }

    /// Adds the time since the last count to the books and to
    /// `rstudio_pool_instance_seconds_total` and `rstudio_pool_cost_total`, per purpose and
    /// state (an assigned instance is `assigned_active` when its user acted in the last five
    /// minutes). Called every reconcile round and at every scrape, so the figures are at most
    /// a round behind. Nothing is counted before the pool is rebuilt after a start; then the
    /// time since the predecessor's last save is put on the instances it left, as they were.
    pub fn accrue(&self) {
        if !self.is_recovered() {
            return;
        }
        let now = self.now();
        let mut added: Vec<(String, Use, f64, f64)> = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let rates = |purpose: &str| {
                self.purposes
                    .get(purpose)
                    .map(|p| p.rates)
                    .unwrap_or_default()
            };
            if st.ledger.since_ms == 0 {
                st.ledger = Ledger::open(now);
            }
            if let Some(restored) = st.restored.take() {
                let left: Vec<Entry> = restored
                    .into_iter()
                    .filter(|(id, _)| st.known.contains_key(id))
                    .map(|(_, e)| e)
                    .collect();
                let gap = now.saturating_sub(st.ledger.counted_to_ms);
                if gap > 0 {
                    info!(
                        "{} s passed since the pool's books were last saved; counted on the {} instances left then",
                        gap / 1000,
                        left.len()
                    );
                }
                st.ledger.accrue(now, &left, &rates);
            }
            let entries: Vec<Entry> = self.entries(st, now).into_iter().map(|(_, e)| e).collect();
            let from = st.ledger.counted_to_ms;
            st.ledger.accrue(now, &entries, &rates);
            if now > from {
                let ms = (now - from) as f64;
                for e in &entries {
                    let per_ms = rates(&e.purpose).per_ms(e.state);
                    added.push((e.purpose.clone(), e.state, ms / 1000.0, ms * per_ms));
                }
            }
            for (purpose, history) in st.history.iter_mut() {
                history.advance(now, self.alpha(purpose));
            }
        }
        let m = metrics();
        for (purpose, state, seconds, cost) in added {
            m.instance_seconds
                .with_label_values(&[&purpose, state.label()])
                .inc_by(seconds);
            m.cost
                .with_label_values(&[&purpose, state.label()])
                .inc_by(cost);
        }
    }

    /// Sets the gauges of the books (`rstudio_pool_ledger_*`), for a scrape.
    pub(super) fn observe_books(&self) {
        let st = self.lock();
        let m = metrics();
        for purpose in self.purposes.keys() {
            for (span, tally) in [("total", &st.ledger.total), ("today", &st.ledger.today)] {
                m.ledger_cost
                    .with_label_values(&[purpose, span])
                    .set(tally.sum(Some(purpose)).cost);
                for state in Use::ALL {
                    m.ledger_seconds
                        .with_label_values(&[purpose, state.label(), span])
                        .set(tally.get(purpose, state).seconds);
                }
            }
        }
    }

    fn alpha(&self, purpose: &str) -> f64 {
        match self.purposes.get(purpose).map(|p| &p.warm) {
            Some(WarmPolicy::Forecast(f)) => f.alpha,
            _ => DEFAULT_ALPHA,
        }
    }

    /// How many free instances `purpose` keeps now, by its warm policy.
    pub(super) fn warm_target(
        &self,
        purpose: &str,
        now: u64,
        history: &mut HashMap<String, History>,
        ready_times: &HashMap<String, VecDeque<u64>>,
    ) -> usize {
        let spec = &self.purposes[purpose];
        let history = history.entry(purpose.to_owned()).or_default();
        history.advance(now, self.alpha(purpose));
        let time_to_ready_ms = ready_times
            .get(purpose)
            .filter(|t| !t.is_empty())
            .map(|t| {
                let mut sorted: Vec<u64> = t.iter().copied().collect();
                sorted.sort_unstable();
                sorted[sorted.len() / 2]
            })
            .unwrap_or(ASSUMED_READY_MS);
        warm::target(
            &spec.warm,
            history,
            Inputs {
                now_ms: now,
                time_to_ready_ms,
                max: spec.limits.max,
            },
        )
    }

    /// The books: since they were opened, today, and per user this month; per purpose, with
    /// each purpose's warm target of the moment. For GET_STATUS's `pools` and the admin page.
    pub fn costs(&self) -> Map<String, Value> {
        let st = self.lock();
        let ledger = &st.ledger;
        let mut out = Map::new();
        for (purpose, pool) in &st.pools {
            let mut users = Map::new();
            for (user, tally) in &ledger.users {
                if let Some(states) = tally.purpose(purpose) {
                    users.insert(user.clone(), tally_json(states, tally, purpose));
                }
            }
            out.insert(
                purpose.clone(),
                json!({
                    "warmPolicy": policy_label(&self.purposes[purpose].warm),
                    "keepFree": pool.min_free(),
                    "hourlyCost": self.purposes[purpose].rates.hourly,
                    "pausedHourlyCost": self.purposes[purpose].rates.paused_hourly,
                    "since": format_time(ledger.since_ms),
                    "total": span_json(&ledger.total, purpose),
                    "today": span_json(&ledger.today, purpose),
                    "period": ledger.period,
                    "users": users,
                }),
            );
        }
        out
    }
}

/// The name of a warm policy, for operators.
pub fn policy_label(policy: &WarmPolicy) -> &'static str {
    match policy {
        WarmPolicy::Fixed { .. } => "fixed",
        WarmPolicy::Schedule(_) => "schedule",
        WarmPolicy::Forecast(_) => "forecast",
    }
}

fn span_json(tally: &Tally, purpose: &str) -> Value {
    match tally.purpose(purpose) {
        Some(states) => tally_json(states, tally, purpose),
        None => tally_json(&Default::default(), tally, purpose),
    }
}

/// `{cost, instanceHours, byState: {free: {hours, cost}, ...}}`.
fn tally_json(
    states: &std::collections::BTreeMap<Use, crate::core::ledger::Amount>,
    tally: &Tally,
    purpose: &str,
) -> Value {
    let sum = tally.sum(Some(purpose));
    let mut by_state = Map::new();
    for state in Use::ALL {
        let a = states.get(&state).copied().unwrap_or_default();
        by_state.insert(
            state.label().into(),
            json!({
                "seconds": round(a.seconds, 1),
                "hours": round(a.hours(), 4),
                "cost": round(a.cost, 6),
            }),
        );
    }
    json!({
        "cost": round(sum.cost, 6),
        "instanceHours": round(sum.hours(), 4),
        "instanceSeconds": round(sum.seconds, 1),
        "byState": by_state,
    })
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// Writes `bytes` to a file beside `path` and renames it over `path`.
fn write_beside(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
