//! The simulator's provider: instances in memory, each ready a drawn time after its launch or
//! its start, on the manager's (virtual) clock. Listings never lag: the pool's handling of a
//! lagging provider is tested against moto, not measured here.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::Decision;
use crate::clock::Clock;
use crate::config::ReadyDist;
use crate::core::ids::InstanceId;
use crate::provider::{
    InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState, TAG_PURPOSE, TAG_USER,
};

struct Sim {
    record: InstanceRecord,
    /// When its workspace answers (ms since the epoch).
    ready_at_ms: u64,
}

#[derive(Default)]
struct Books {
    instances: BTreeMap<InstanceId, Sim>,
    /// Every launch of the run, in order, with its number.
    launches: Vec<Decision>,
    /// Launch numbers of instances gone, so that late answers still name them.
    numbers: BTreeMap<InstanceId, u64>,
}

/// Instances that exist only in memory.
pub struct SimProvider {
    clock: Clock,
    ready: ReadyDist,
    resume: ReadyDist,
    rng: Mutex<StdRng>,
    books: Mutex<Books>,
}

impl SimProvider {
    pub fn new(clock: Clock, ready: ReadyDist, resume: ReadyDist, seed: u64) -> Self {
        Self {
            clock,
            ready,
            resume,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            books: Mutex::default(),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A time to ready drawn from `dist` (log-normal), ms.
    fn draw(&self, dist: ReadyDist) -> u64 {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // The p95 of a log-normal is its median times exp(1.645 sigma).
        let sigma = (dist.p95_s / dist.median_s).ln() / 1.644_853_6;
        let seconds = super::trace::sample_lognormal(&mut *rng, dist.median_s, sigma);
        (seconds * 1000.0).round() as u64
    }

    /// The launches of the run, in order.
    pub fn launches(&self) -> Vec<Decision> {
        self.books().launches.clone()
    }

    /// Which launch made `id` (0 when not this provider's).
    pub fn launch_number(&self, id: &InstanceId) -> u64 {
        self.books().numbers.get(id).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn launch_deadline(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        let now = self.clock.now_ms();
        let ready_at_ms = now + self.draw(self.ready);
        let mut books = self.books();
        let n = books.launches.len() as u64 + 1;
        let id = InstanceId::from_bits(u128::from(n));
        let mut tags: BTreeMap<String, String> = spec.tags.iter().cloned().collect();
        tags.insert(TAG_PURPOSE.into(), spec.purpose.clone());
        let record = InstanceRecord {
            id: id.clone(),
            state: ProviderState::Running,
            tags,
            address: Some(format!("sim-{n}:8787")),
            launched_at_ms: now,
            key_name: None,
            client_token: Some(spec.client_token.clone()),
        };
        books.launches.push(Decision::Launch {
            at_ms: now,
            purpose: spec.purpose.clone(),
            n,
            for_user: record.tags.get(TAG_USER).cloned(),
        });
        books.numbers.insert(id.clone(), n);
        books.instances.insert(
            id,
            Sim {
                record: record.clone(),
                ready_at_ms,
            },
        );
        Ok(record)
    }

    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        Ok(self
            .books()
            .instances
            .values()
            .map(|s| s.record.clone())
            .collect())
    }

    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError> {
        let mut books = self.books();
        let sim = books
            .instances
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        for (k, v) in tags {
            sim.record.tags.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, _hibernate: bool) -> Result<(), ProviderError> {
        let mut books = self.books();
        let sim = books
            .instances
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        sim.record.state = ProviderState::Stopped;
        Ok(())
    }

    async fn start(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, ProviderError> {
        let ready_at_ms = self.clock.now_ms() + self.draw(self.resume);
        let mut books = self.books();
        let sim = books
            .instances
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        sim.record.state = ProviderState::Running;
        sim.ready_at_ms = ready_at_ms;
        Ok(Some(sim.record.clone()))
    }

    fn answers(&self, id: &InstanceId) -> Option<bool> {
        let now = self.clock.now_ms();
        Some(
            self.books()
                .instances
                .get(id)
                .is_some_and(|s| s.record.state == ProviderState::Running && now >= s.ready_at_ms),
        )
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.books().instances.remove(id);
        Ok(())
    }
}
