//! The simulator: a trace of sessions replayed through the server's own [`PoolManager`]
//! (its pools, warm policies, reconcile loop, idle reaper and books) under virtual time,
//! against a provider whose workspaces are ready after a drawn time to ready.
//!
//! Time is tokio's, paused: the runtime moves the clock on to the next timer whenever every
//! task waits, so the manager's sleeps, timeouts and rounds run as written and a month of a
//! pool takes seconds. One thread, so that a run is the same every time for a seed.

pub mod cli;
pub mod provider;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::clock::Clock;
use crate::config::{AuthConfig, Config, ReadyDist};
use crate::core::ids::{InstanceId, UserId};
use crate::core::ledger::{Ledger, Use};
use crate::core::warm::WarmPolicy;
use crate::manager::links::UserLinks;
use crate::manager::PoolManager;
use provider::SimProvider;
use trace::Session;

/// How often a simulated user who is active acts (a keystroke, a click): often enough that
/// the idle clock and the active share are right to the minute.
const ACTION_EVERY_MS: u64 = 60_000;

/// What to simulate besides the trace.
#[derive(Debug, Clone)]
pub struct Options {
    /// The policy's name for the report, and the policy of each purpose (none: as
    /// configured).
    pub policy: (String, BTreeMap<String, WarmPolicy>),
    /// Days at the start of the trace that warm the pool up (and teach the forecast) and
    /// are left out of the figures.
    pub skip_days: u32,
    pub seed: u64,
    pub ready: ReadyDist,
    pub resume: ReadyDist,
}

/// One decision of the pool, for comparing runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The n-th launch of the run (from 1), for a user who found nothing free or to keep
    /// instances warm.
    Launch {
        at_ms: u64,
        purpose: String,
        n: u64,
        for_user: Option<String>,
    },
    /// A request answered: with which launch's instance, and how.
    Assign {
        at_ms: u64,
        user: String,
        purpose: String,
        launch: u64,
        how: How,
        wait_ms: u64,
    },
    /// A request the pool refused (full, launches paused).
    Refuse {
        at_ms: u64,
        user: String,
        reason: String,
    },
}

/// How a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// The user's own instance, ready.
    Own,
    /// A free instance that was ready.
    Warm,
    /// An instance still starting (a warm-up launch, or one launched for them).
    Cold,
    /// Their paused instance, started again.
    Resume,
}

/// What a run came to.
#[derive(Debug, Clone)]
pub struct Report {
    pub policy: String,
    /// Waits of the requests in the measured span, ms.
    pub waits_ms: Vec<u64>,
    pub served: BTreeMap<&'static str, usize>,
    pub refused: usize,
    /// The books of the measured span.
    pub ledger: Ledger,
    pub decisions: Vec<Decision>,
    /// The span measured, ms since the epoch.
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Report {
    /// The `q`-quantile of the waits (nearest rank), seconds.
    pub fn wait_quantile(&self, q: f64) -> f64 {
        if self.waits_ms.is_empty() {
            return 0.0;
        }
        let mut w = self.waits_ms.clone();
        w.sort_unstable();
        let rank = ((q * w.len() as f64).ceil() as usize).clamp(1, w.len());
        w[rank - 1] as f64 / 1000.0
    }

    /// The share of requests answered with a workspace that was ready.
    pub fn warm_share(&self) -> f64 {
        let ready = self.served.get("own").copied().unwrap_or(0)
            + self.served.get("warm").copied().unwrap_or(0);
        let all = self.waits_ms.len() + self.refused;
        if all == 0 {
            return 1.0;
        }
        ready as f64 / all as f64
    }

    /// Instance-hours in `state`, all purposes.
    pub fn hours(&self, state: Use) -> f64 {
        self.ledger
            .total
            .0
            .keys()
            .map(|p| self.ledger.total.get(p, state).hours())
            .sum()
    }

    /// Money, all purposes and states.
    pub fn cost(&self) -> f64 {
        self.ledger.total.sum(None).cost
    }
}

/// Replays `sessions` through a pool made from `config` with `options`.
pub fn run(config: &Config, sessions: &[Session], options: &Options) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(replay(config, sessions, options))
}

async fn replay(config: &Config, sessions: &[Session], options: &Options) -> Report {
    const DAY_MS: u64 = 86_400_000;
    let first = sessions.first().map_or(0, |s| s.at_ms);
    let start_ms = first - first % DAY_MS;
    let measure_from = start_ms + u64::from(options.skip_days) * DAY_MS;
    let last_end = sessions
        .iter()
        .map(|s| s.at_ms + s.end_ms)
        .max()
        .unwrap_or(start_ms);
    let clock = Clock::starting_at(start_ms);
    let mut purposes = config.purposes.clone();
    for (name, p) in purposes.iter_mut() {
        if let Some(policy) = options.policy.1.get(name) {
            p.warm = policy.clone();
        }
    }
    let default_purpose = purposes
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| "rstudio".into());
    let provider = Arc::new(SimProvider::new(
        clock,
        options.ready,
        options.resume,
        options.seed,
    ));
    let links = UserLinks::new(&config.proxy, &AuthConfig::None, None);
    let manager = PoolManager::with_clock(
        provider.clone(),
        purposes.clone(),
        links,
        config.ready_timeout,
        config.breaker,
        clock,
    );
    manager.open_books();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let looping = tokio::spawn(Arc::clone(&manager).run(config.reconcile_interval, stopped));
    let answers: Arc<Mutex<Vec<Decision>>> = Arc::default();
    // Who was last answered with each instance: a user answered with it again is back on
    // their own.
    let served: Arc<Mutex<HashMap<InstanceId, String>>> = Arc::default();
    let mut users = Vec::new();
    for session in sessions {
        let manager = Arc::clone(&manager);
        let answers = Arc::clone(&answers);
        let served = Arc::clone(&served);
        let session = session.clone();
        let purpose = session
            .purpose
            .clone()
            .unwrap_or_else(|| default_purpose.clone());
        let ready_timeout = config.ready_timeout;
        let provider = Arc::clone(&provider);
        users.push(tokio::spawn(async move {
            sleep_until(&manager, session.at_ms).await;
            user_session(
                &manager,
                &provider,
                &session,
                &purpose,
                ready_timeout,
                &answers,
                &served,
            )
            .await;
        }));
    }
    // Books of the measured span only: from `measure_from` to the end of the day (UTC) of
    // the last arrival, so that whole days are measured, the same for every policy.
    let last_at = sessions.last().map_or(start_ms, |s| s.at_ms);
    let measure_to = (last_at + 1)
        .div_ceil(DAY_MS)
        .max(measure_from / DAY_MS + 1)
        * DAY_MS;
    let books = {
        let manager = Arc::clone(&manager);
        tokio::spawn(async move {
            sleep_until(&manager, measure_from).await;
            manager.accrue();
            manager.open_books();
            sleep_until(&manager, measure_to).await;
            manager.accrue();
            manager.ledger()
        })
    };
    for user in users {
        let _ = user.await;
    }
    let ledger = books.await.unwrap_or_default();
    // Whatever is left runs down: idle instances are paused or ended by the pool itself.
    let timeout = purposes
        .values()
        .map(|p| p.idle_timeout)
        .max()
        .unwrap_or_default();
    sleep_until(
        &manager,
        last_end.max(manager.now()) + timeout.as_millis() as u64 + 60_000,
    )
    .await;
    let _ = stop.send(true);
    let _ = looping.await;
    let mut decisions = provider.launches();
    decisions.extend(answers.lock().unwrap_or_else(|e| e.into_inner()).drain(..));
    decisions.sort_by_key(|d| match d {
        Decision::Launch { at_ms, .. }
        | Decision::Assign { at_ms, .. }
        | Decision::Refuse { at_ms, .. } => *at_ms,
    });
    let mut waits_ms = Vec::new();
    let mut served: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refused = 0;
    for d in &decisions {
        match d {
            Decision::Assign {
                at_ms,
                wait_ms,
                how,
                ..
            } if (measure_from..measure_to).contains(at_ms) => {
                waits_ms.push(*wait_ms);
                *served
                    .entry(match how {
                        How::Own => "own",
                        How::Warm => "warm",
                        How::Cold => "cold",
                        How::Resume => "resume",
                    })
                    .or_default() += 1;
            }
            Decision::Refuse { at_ms, .. } if (measure_from..measure_to).contains(at_ms) => {
                refused += 1
            }
            _ => {}
        }
    }
    Report {
        policy: options.policy.0.clone(),
        waits_ms,
        served,
        refused,
        ledger,
        decisions,
        from_ms: measure_from,
        to_ms: measure_to,
    }
}

/// One user's session: ask, wait until the workspace answers, act in the active periods,
/// leave.
async fn user_session(
    manager: &Arc<PoolManager>,
    provider: &SimProvider,
    session: &Session,
    purpose: &str,
    ready_timeout: Duration,
    answers: &Mutex<Vec<Decision>>,
    served: &Mutex<HashMap<InstanceId, String>>,
) {
    let asked = manager.now();
    let Ok(user) = UserId::parse(&session.user) else {
        return;
    };
    let decision = match manager.request(&user, purpose).await {
        Ok(assignment) => {
            let id = assignment.instance_id;
            let before = served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), session.user.clone());
            let how = if assignment.status == "resuming" {
                How::Resume
            } else if !assignment.ready {
                How::Cold
            } else if before.as_deref() == Some(session.user.as_str()) {
                How::Own
            } else {
                How::Warm
            };
            if !assignment.ready {
                manager.wait_ready(&id, ready_timeout).await;
            }
            let answered = manager.now();
            let decision = Decision::Assign {
                at_ms: asked,
                user: session.user.clone(),
                purpose: purpose.to_owned(),
                launch: provider.launch_number(&id),
                how,
                wait_ms: answered - asked,
            };
            answers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(decision);
            for &(from, to) in &session.active {
                sleep_until(manager, session.at_ms + from).await;
                loop {
                    if let Some(up) = manager.upstream(id.as_str()) {
                        up.touch(manager.now());
                    }
                    let next = manager.now() + ACTION_EVERY_MS;
                    if next >= session.at_ms + to {
                        break;
                    }
                    sleep_until(manager, next).await;
                }
            }
            return;
        }
        Err(e) => Decision::Refuse {
            at_ms: asked,
            user: session.user.clone(),
            reason: e.to_string(),
        },
    };
    answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(decision);
}

async fn sleep_until(manager: &PoolManager, at_ms: u64) {
    let now = manager.now();
    if at_ms > now {
        tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
    }
}
