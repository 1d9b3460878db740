//! What the pool believes of instances when the provider's listings lag behind its launches
//! and terminations (EC2 is eventually consistent: a new instance may be missing from
//! `DescribeInstances` for seconds, and a listing taken while a launch is in flight shows an
//! instance whose launch has not answered yet). Pure: time comes in as milliseconds.
//!
//! Two rules, both about not acting on a listing too early:
//! - a known instance missing from listings is forgotten only once it has been missing for the
//!   grace period, unless the provider confirms it gone (a lookup by id shows it terminated,
//!   or the provider's listings never lag);
//! - an instance the pool does not know is left alone while it may be a launch of ours whose
//!   answer has not come back: launched after this process could launch, and younger than the
//!   grace period.

use std::collections::HashMap;

use super::ids::InstanceId;

/// The grace periods of a provider whose listings lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    /// How long a known instance may be missing from listings before it is forgotten.
    pub missing_ms: u64,
    /// How long after its launch an unknown instance may still be a launch of ours in flight.
    pub unknown_ms: u64,
}

/// What a listing or a lookup by id says of an instance the pool knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Listed (or found live by a lookup).
    Live,
    /// Confirmed gone: terminated, or missing from a provider whose listings never lag.
    Gone,
    /// Missing, with nothing to confirm why.
    Missing,
}

/// Known instances missing from listings, and since when.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    missing_since: HashMap<InstanceId, u64>,
}

impl Presence {
    /// Takes in what a listing at `now_ms` says of `id`; true when the pool should forget it.
    pub fn sighted(
        &mut self,
        id: &InstanceId,
        sighting: Sighting,
        now_ms: u64,
        grace: Grace,
    ) -> bool {
        match sighting {
            Sighting::Live => {
                self.missing_since.remove(id);
                false
            }
            Sighting::Gone => {
                self.missing_since.remove(id);
                true
            }
            Sighting::Missing => {
                let since = *self.missing_since.entry(id.clone()).or_insert(now_ms);
                let gone = now_ms.saturating_sub(since) >= grace.missing_ms;
                if gone {
                    self.missing_since.remove(id);
                }
                gone
            }
        }
    }

    /// The pool no longer knows `id`.
    pub fn forget(&mut self, id: &InstanceId) {
        self.missing_since.remove(id);
    }

    pub fn missing(&self) -> usize {
        self.missing_since.len()
    }
}

/// Whether an instance the pool does not know may be adopted or terminated now. One launched
/// before `own_launches_from_ms` (when this process could first launch) is a predecessor's, and
/// settled at once; a younger one may be a launch of ours still in flight until `unknown_ms`
/// after its launch.
pub fn unknown_is_settled(
    launched_at_ms: u64,
    now_ms: u64,
    own_launches_from_ms: u64,
    grace: Grace,
) -> bool {
    launched_at_ms.saturating_add(LAUNCH_TIME_SLACK_MS) < own_launches_from_ms
        || now_ms.saturating_sub(launched_at_ms) >= grace.unknown_ms
}

/// How much earlier than the truth a launch time may read: EC2 gives whole seconds (an
/// instance launched at 10.9 s reads 10 s), and its clock and ours drift apart a little. A
/// launch of ours must never pass for a predecessor's.
const LAUNCH_TIME_SLACK_MS: u64 = 2000;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use proptest::prelude::*;

    use super::*;
    use crate::core::ids::UserId;
    use crate::core::pool::{Adoption, Grant, Limits, Phase, Pool, Ticket};

    const GRACE: Grace = Grace {
        missing_ms: 60_000,
        unknown_ms: 40_000,
    };

    fn id(n: u128) -> InstanceId {
        InstanceId::from_bits(n)
    }

    #[test]
    fn a_missing_instance_is_forgotten_after_the_grace_or_at_once_when_confirmed() {
        let mut p = Presence::default();
        assert!(!p.sighted(&id(1), Sighting::Missing, 1000, GRACE));
        assert!(!p.sighted(&id(1), Sighting::Missing, 60_999, GRACE));
        // Seen again: the clock starts over.
        assert!(!p.sighted(&id(1), Sighting::Live, 61_000, GRACE));
        assert!(!p.sighted(&id(1), Sighting::Missing, 62_000, GRACE));
        assert!(p.sighted(&id(1), Sighting::Missing, 122_000, GRACE));
        assert_eq!(p.missing(), 0);
        assert!(p.sighted(&id(2), Sighting::Gone, 0, GRACE));
    }

    #[test]
    fn an_unknown_instance_waits_unless_it_predates_our_launches() {
        assert!(unknown_is_settled(7_999, 10_000, 10_000, GRACE));
        // A launch of ours at 10.5 s that EC2 stamps 10 s (whole seconds), when we could
        // launch from 10.2 s: not a predecessor's.
        assert!(!unknown_is_settled(10_000, 10_600, 10_200, GRACE));
        assert!(!unknown_is_settled(9_000, 10_000, 10_000, GRACE));
        assert!(!unknown_is_settled(10_000, 10_000, 10_000, GRACE));
        assert!(!unknown_is_settled(10_000, 49_999, 10_000, GRACE));
        assert!(unknown_is_settled(10_000, 50_000, 10_000, GRACE));
    }

    /// An EC2 as the pool meets it: each instance becomes visible in listings some time after
    /// its launch, and a launch's answer can be lost although the instance was made.
    #[derive(Debug, Default)]
    struct LaggingProvider {
        /// id -> (launched at, visible from, client token, owner tag); terminated ones leave.
        alive: BTreeMap<InstanceId, (u64, u64, u64, Option<UserId>)>,
    }

    impl LaggingProvider {
        fn listing(&self, now: u64) -> Vec<(InstanceId, u64, u64, Option<UserId>)> {
            self.alive
                .iter()
                .filter(|(_, (_, visible, _, _))| now >= *visible)
                .map(|(i, (at, _, token, owner))| (i.clone(), *at, *token, owner.clone()))
                .collect()
        }
    }

    /// The manager's rules over the pure parts: what `PoolManager` does each round.
    struct Model {
        pool: Pool,
        presence: Presence,
        /// Launches in doubt, by client token.
        doubts: HashMap<u64, (Ticket, u64)>,
        /// When this process may first launch (after a restart: once listings caught up).
        own_from: u64,
        /// When the last listing the pool took in was taken.
        synced_at: u64,
    }

    impl Model {
        fn new(max: usize, min_free: usize, now: u64, lag: u64) -> Self {
            Self {
                pool: Pool::new(Limits { min_free, max }),
                presence: Presence::default(),
                doubts: HashMap::new(),
                own_from: now + lag,
                synced_at: now,
            }
        }

        /// Launches (and users who hold nothing) wait until a listing taken after `own_from`
        /// was taken in: by then every instance a predecessor launched is listed.
        fn may_launch(&self) -> bool {
            self.synced_at >= self.own_from
        }

        fn adopt(&mut self, id: InstanceId, owner: Option<UserId>) -> Adoption {
            self.pool.adopt(id, owner, Phase::Launching)
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Request(u8),
        TopUpAndLaunch { lag: u64, lost: bool },
        Terminate(usize),
        Sync,
        Restart,
        Wait(u64),
    }

    fn step(max_lag: u64) -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..8u8).prop_map(Step::Request),
            3 => (0..=max_lag, proptest::bool::weighted(0.2))
                .prop_map(|(lag, lost)| Step::TopUpAndLaunch { lag, lost }),
            1 => any::<usize>().prop_map(Step::Terminate),
            4 => Just(Step::Sync),
            1 => Just(Step::Restart),
            3 => (0..20_000u64).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// With listings lagging up to 15 s behind launches, lost launch answers and restarts:
        /// a live instance is never forgotten, live instances never exceed the maximum (I3),
        /// and no instance ever has two owners (I2).
        #[test]
        fn a_lagging_listing_loses_nothing_and_never_overfills(
            max in 1..6usize,
            min_free in 0..3usize,
            steps in proptest::collection::vec(step(15_000), 1..150),
        ) {
            const LAG: u64 = 15_000;
            let mut now = 1_000_000u64;
            let mut ec2 = LaggingProvider::default();
            let mut m = Model::new(max, min_free, now, 0);
            let mut next = 0u128;
            let mut owners: HashMap<InstanceId, UserId> = HashMap::new();
            let mut told: HashMap<UserId, InstanceId> = HashMap::new();
            for s in steps {
                match s {
                    Step::Request(u) => {
                        let user = UserId::parse(&format!("u{u}")).unwrap();
                        // Before the listings caught up, a user who holds nothing may own an
                        // instance not listed yet: they wait (here, the request is dropped).
                        if !m.may_launch() && m.pool.holding(&user).is_none() {
                            continue;
                        }
                        let given = match m.pool.request(&user) {
                            Ok(Grant::Assigned(i)) => {
                                m.pool.recorded(&i).unwrap();
                                if let Some(e) = ec2.alive.get_mut(&i) {
                                    e.3 = Some(user.clone());
                                }
                                Some(i)
                            }
                            Ok(Grant::Launch(t)) => {
                                next += 1;
                                ec2.alive.insert(id(next), (now, now + LAG / 2, next as u64, Some(user.clone())));
                                m.pool.launched(t, id(next), Some(&user)).unwrap();
                                Some(id(next))
                            }
                            Ok(Grant::Held(i)) => Some(i),
                            _ => None,
                        };
                        // A user told an instance is told that one as long as it lives.
                        if let Some(i) = given {
                            if let Some(before) = told.get(&user).filter(|b| ec2.alive.contains_key(*b)) {
                                prop_assert_eq!(before, &i, "{} was told two instances", user);
                            }
                            told.insert(user, i);
                        }
                    }
                    Step::TopUpAndLaunch { lag, lost } => {
                        if !m.may_launch() {
                            continue;
                        }
                        for t in m.pool.top_up() {
                            next += 1;
                            let token = next as u64;
                            ec2.alive.insert(id(next), (now, now + lag, token, None));
                            if lost {
                                m.pool.launch_in_doubt(t);
                                m.doubts.insert(token, (t, now));
                            } else {
                                m.pool.launched(t, id(next), None).unwrap();
                            }
                        }
                    }
                    Step::Terminate(n) => {
                        let known: Vec<InstanceId> = m.pool.instances().map(|(i, _)| i.clone()).collect();
                        if !known.is_empty() {
                            let i = known[n % known.len()].clone();
                            m.pool.release(&i).unwrap();
                            ec2.alive.remove(&i);
                            m.pool.forget(&i);
                            m.presence.forget(&i);
                        }
                    }
                    Step::Sync => {
                        let listing = ec2.listing(now);
                        let listed: HashSet<InstanceId> = listing.iter().map(|l| l.0.clone()).collect();
                        let known: Vec<InstanceId> = m.pool.instances().map(|(i, _)| i.clone()).collect();
                        for i in known {
                            let sighting = if listed.contains(&i) { Sighting::Live } else { Sighting::Missing };
                            if m.presence.sighted(&i, sighting, now, GRACE) {
                                prop_assert!(!ec2.alive.contains_key(&i), "forgot {} which is alive", i);
                                m.pool.forget(&i);
                            }
                        }
                        for (i, launched, token, owner) in listing {
                            if m.pool.instance(&i).is_some() {
                                continue;
                            }
                            if let Some((t, _)) = m.doubts.remove(&token) {
                                m.pool.doubt_resolved(t);
                            } else if !unknown_is_settled(launched, now, m.own_from, GRACE) {
                                continue;
                            }
                            if m.adopt(i.clone(), owner) == Adoption::Surplus {
                                ec2.alive.remove(&i);
                            }
                        }
                        // A doubt outlives the time its instance would take to be listed: none.
                        let expired: Vec<u64> = m.doubts.iter()
                            .filter(|(_, (_, at))| now.saturating_sub(*at) >= GRACE.unknown_ms)
                            .map(|(token, _)| *token).collect();
                        for token in expired {
                            let (t, _) = m.doubts.remove(&token).unwrap();
                            m.pool.doubt_resolved(t);
                        }
                        m.synced_at = now;
                    }
                    Step::Restart => {
                        // Everything in memory is lost; the new process rebuilds from what the
                        // listing shows now, and launches nothing until listings caught up.
                        m = Model::new(max, min_free, now, LAG);
                        let mut listing = ec2.listing(now);
                        listing.sort_by_key(|l| l.1);
                        for (i, _, _, owner) in listing {
                            if m.adopt(i.clone(), owner) == Adoption::Surplus {
                                ec2.alive.remove(&i);
                            }
                        }
                    }
                    Step::Wait(ms) => now += ms,
                }
                m.pool.check_invariants().map_err(TestCaseError::fail)?;
                prop_assert!(ec2.alive.len() <= max,
                    "{} instances alive with a maximum of {}", ec2.alive.len(), max);
                for (i, e) in &ec2.alive {
                    if let Some(user) = &e.3 {
                        let first = owners.entry(i.clone()).or_insert_with(|| user.clone());
                        prop_assert_eq!(&*first, user, "I2: {} changed hands", i);
                    }
                }
            }
        }
    }
}
