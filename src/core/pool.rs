//! The pool of one purpose as a pure state machine: which instances exist, who holds which,
//! what to launch and what may be handed out. No I/O and no clock: the pool manager feeds it
//! events (a launch finished, an instance became ready, a termination completed) and carries out
//! the decisions it returns.
//!
//! The invariants of DESIGN.md hold after every call:
//! - I1: a user holds at most one live instance (or one pending launch);
//! - I2: an instance gets an owner at most once and keeps it until it is gone, and nobody is
//!   told an instance is theirs before the provider has recorded it ([`Grant::Recording`]);
//! - I3: live instances, pending launches and resuming ones included, never exceed `max`;
//!   paused instances use no compute and do not count;
//! - I4: [`Pool::top_up`] brings free capacity up to `min_free` as far as `max` allows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::ids::{InstanceId, UserId};

/// Sizes of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Free instances (ready or launching, nobody's yet) to keep warm.
    pub min_free: usize,
    /// Live instances of the pool at most, launching and terminating ones included.
    pub max: usize,
}

/// A launch the pool has decided on whose instance id the provider has not reported yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Where an instance is in its life, as far as the pool is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Launched, the workspace does not answer its readiness probe yet.
    Launching,
    /// The workspace answers.
    Ready,
    /// Termination has begun; it still counts against `max` until it is gone.
    Terminating,
    /// Stopped while its owner was away, their work kept: it is theirs alone, and it does
    /// not count against `max`.
    Paused,
    /// Its owner came back: starting again. Counts against `max` like a launch.
    Resuming,
}

/// One instance the pool knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub phase: Phase,
    pub owner: Option<UserId>,
    /// Whether the provider has recorded the owner (the EC2 tag is written). Until it has, the
    /// owner is not told the instance is theirs: a restart would see a free instance.
    pub recorded: bool,
    /// Stopped (paused, or terminating after a pause): it uses no compute and does not count
    /// against `max`.
    pub stopped: bool,
}

impl Instance {
    fn is_free(&self) -> bool {
        self.owner.is_none() && self.phase != Phase::Terminating
    }
}

/// What a user holds: an instance, or a launch that will become one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    Instance(InstanceId),
    Pending(Ticket),
}

/// The answer to a user's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The user already holds this instance, and the provider has recorded it.
    Held(InstanceId),
    /// The user holds this instance, but the provider has not recorded the owner yet: wait
    /// for the recording under way and answer with its outcome.
    Recording(InstanceId),
    /// A free instance was just assigned to the user: record the owner with the provider,
    /// then call [`Pool::recorded`].
    Assigned(InstanceId),
    /// A launch for this user is under way already: wait for its outcome.
    Pending(Ticket),
    /// The user's instance is paused and was just marked resuming: start it at the
    /// provider, then call [`Pool::resumed`] or [`Pool::resume_failed`].
    Resume(InstanceId),
    /// No free instance: launch one for this user under this ticket.
    Launch(Ticket),
}

/// Why a request cannot be granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the pool is at its maximum of {max} instances and none is free; try again when an instance has been released, or raise MAX_INSTANCES")]
    Full { max: usize },
    #[error("instance {0} is not in the pool")]
    UnknownInstance(InstanceId),
    #[error("launch {0:?} is not pending")]
    UnknownTicket(Ticket),
    #[error("your workspace {id} is paused, and the pool is at its maximum of {max} running instances; try again when an instance has been released, or raise MAX_INSTANCES")]
    FullForResume { id: InstanceId, max: usize },
}

/// How an instance found at the provider was taken in by [`Pool::adopt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// It is now part of the pool.
    Adopted,
    /// Known already; nothing changed.
    Known,
    /// It cannot be kept (its owner holds another instance, or the pool is full without it):
    /// terminate it.
    Surplus,
}

/// Counts of one pool, for status answers and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Census {
    pub assigned: usize,
    pub free_ready: usize,
    pub free_launching: usize,
    pub pending_launches: usize,
    pub paused: usize,
    pub resuming: usize,
    /// Launches whose answer was lost: they may have made an instance not listed yet.
    pub launches_in_doubt: usize,
    pub terminating: usize,
}

#[derive(Debug, Clone)]
pub struct Pool {
    limits: Limits,
    instances: BTreeMap<InstanceId, Instance>,
    /// Launches decided on but not reported back, with the user each one is for.
    pending: BTreeMap<Ticket, Option<UserId>>,
    /// Launches whose outcome is unknown (the provider call timed out or its answer was lost):
    /// the instance may exist without the pool seeing it yet, so each still counts against
    /// `max` until its instance is found or it is certain there is none (I3).
    in_doubt: BTreeSet<Ticket>,
    holdings: HashMap<UserId, Holding>,
    /// The free instances by phase: an index over `instances`, so that a request finds one
    /// without looking at every assigned instance (a burst of 200 assignments over 1,400
    /// instances spent more time in that scan than in any other function of ours).
    free_ready: BTreeSet<InstanceId>,
    free_launching: BTreeSet<InstanceId>,
    /// How many instances are stopped: kept in step like the free index.
    stopped: usize,
    next_ticket: u64,
}

impl Pool {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            instances: BTreeMap::new(),
            pending: BTreeMap::new(),
            in_doubt: BTreeSet::new(),
            holdings: HashMap::new(),
            free_ready: BTreeSet::new(),
            free_launching: BTreeSet::new(),
            stopped: 0,
            next_ticket: 1,
        }
    }

    /// Live instances (paused ones use no compute), pending launches and launches in doubt:
    /// what `max` bounds.
    pub fn live(&self) -> usize {
        self.instances.len() - self.stopped + self.pending.len() + self.in_doubt.len()
    }

    /// Free capacity: unowned instances that are not terminating, and unowned pending launches.
    pub fn free(&self) -> usize {
        self.free_ready.len()
            + self.free_launching.len()
            + self.pending.values().filter(|o| o.is_none()).count()
    }

    /// The free index an instance in this state belongs to.
    fn index_of(&mut self, instance: &Instance) -> Option<&mut BTreeSet<InstanceId>> {
        if !instance.is_free() {
            return None;
        }
        Some(match instance.phase {
            Phase::Ready => &mut self.free_ready,
            _ => &mut self.free_launching,
        })
    }

    /// Adds an instance, indexed.
    fn insert(&mut self, id: InstanceId, instance: Instance) {
        if let Some(index) = self.index_of(&instance) {
            index.insert(id.clone());
        }
        if instance.stopped {
            self.stopped += 1;
        }
        self.instances.insert(id, instance);
    }

    /// Removes an instance and its index entry.
    fn remove(&mut self, id: &InstanceId) -> Option<Instance> {
        let instance = self.instances.remove(id)?;
        if let Some(index) = self.index_of(&instance) {
            index.remove(id);
        }
        if instance.stopped {
            self.stopped -= 1;
        }
        Some(instance)
    }

    /// Changes an instance, keeping its index entry in step.
    fn update<T>(
        &mut self,
        id: &InstanceId,
        change: impl FnOnce(&mut Instance) -> T,
    ) -> Result<T, PoolError> {
        let mut instance = self
            .remove(id)
            .ok_or_else(|| PoolError::UnknownInstance(id.clone()))?;
        let out = change(&mut instance);
        self.insert(id.clone(), instance);
        Ok(out)
    }

    pub fn instance(&self, id: &InstanceId) -> Option<&Instance> {
        self.instances.get(id)
    }

    pub fn instances(&self) -> impl Iterator<Item = (&InstanceId, &Instance)> {
        self.instances.iter()
    }

    pub fn holding(&self, user: &UserId) -> Option<&Holding> {
        self.holdings.get(user)
    }

    pub fn census(&self) -> Census {
        let mut census = Census {
            pending_launches: self.pending.len(),
            launches_in_doubt: self.in_doubt.len(),
            ..Census::default()
        };
        for instance in self.instances.values() {
            match (instance.phase, &instance.owner) {
                (Phase::Terminating, _) => census.terminating += 1,
                (Phase::Paused, _) => census.paused += 1,
                (Phase::Resuming, _) => census.resuming += 1,
                (_, Some(_)) => census.assigned += 1,
                (Phase::Ready, None) => census.free_ready += 1,
                (Phase::Launching, None) => census.free_launching += 1,
            }
        }
        census
    }

    /// A user asks for a workspace. Ready free instances are handed out before launching ones.
    pub fn request(&mut self, user: &UserId) -> Result<Grant, PoolError> {
        match self.holdings.get(user) {
            Some(Holding::Instance(id)) => {
                let id = id.clone();
                let instance = self.instances.get(&id);
                if instance.is_some_and(|i| i.phase == Phase::Paused) {
                    // The user's work is on it: resume it, never hand out another (I6).
                    if self.live() >= self.limits.max {
                        return Err(PoolError::FullForResume {
                            id,
                            max: self.limits.max,
                        });
                    }
                    self.update(&id, |i| {
                        i.phase = Phase::Resuming;
                        i.stopped = false;
                    })?;
                    return Ok(Grant::Resume(id));
                }
                let recorded = instance.is_some_and(|i| i.recorded);
                return Ok(if recorded {
                    Grant::Held(id)
                } else {
                    Grant::Recording(id)
                });
            }
            Some(Holding::Pending(ticket)) => return Ok(Grant::Pending(*ticket)),
            None => {}
        }
        let free = self
            .free_ready
            .first()
            .or_else(|| self.free_launching.first())
            .cloned();
        if let Some(id) = free {
            self.update(&id, |instance| {
                instance.owner = Some(user.clone());
                instance.recorded = false;
            })?;
            self.holdings
                .insert(user.clone(), Holding::Instance(id.clone()));
            return Ok(Grant::Assigned(id));
        }
        // A free pending launch is taken over by the user rather than launching another.
        if let Some((&ticket, owner)) = self.pending.iter_mut().find(|(_, o)| o.is_none()) {
            *owner = Some(user.clone());
            self.holdings.insert(user.clone(), Holding::Pending(ticket));
            return Ok(Grant::Pending(ticket));
        }
        if self.live() >= self.limits.max {
            return Err(PoolError::Full {
                max: self.limits.max,
            });
        }
        let ticket = self.new_ticket(Some(user.clone()));
        self.holdings.insert(user.clone(), Holding::Pending(ticket));
        Ok(Grant::Launch(ticket))
    }

    /// Sets how many free instances to keep (the warm policy's target of the moment), at
    /// most the maximum.
    pub fn set_min_free(&mut self, min_free: usize) {
        self.limits.min_free = min_free.min(self.limits.max);
    }

    /// How many free instances the pool keeps now.
    pub fn min_free(&self) -> usize {
        self.limits.min_free
    }

    /// Warm instances beyond what the pool keeps free, which may be let go: ready and free
    /// ones only (never one starting), the highest ids first (requests take the lowest).
    pub fn surplus(&self) -> Vec<InstanceId> {
        let excess = self.free().saturating_sub(self.limits.min_free);
        self.free_ready.iter().rev().take(excess).cloned().collect()
    }

    /// Launches to start so that free capacity reaches `min_free` without passing `max` (I4).
    pub fn top_up(&mut self) -> Vec<Ticket> {
        let mut tickets = Vec::new();
        let mut free = self.free();
        while free < self.limits.min_free && self.live() < self.limits.max {
            tickets.push(self.new_ticket(None));
            free += 1;
        }
        tickets
    }

    /// The user a pending launch is for, if any.
    pub fn ticket_owner(&self, ticket: Ticket) -> Option<&UserId> {
        self.pending.get(&ticket).and_then(Option::as_ref)
    }

    /// The provider launched `ticket` as instance `id`, with `tagged` as the owner in its
    /// launch tags. The ticket's user, if any, now holds it; if that user took the launch
    /// over after it was sent (so `tagged` is not them), the owner still has to be recorded.
    pub fn launched(
        &mut self,
        ticket: Ticket,
        id: InstanceId,
        tagged: Option<&UserId>,
    ) -> Result<(), PoolError> {
        let owner = self
            .pending
            .remove(&ticket)
            .ok_or(PoolError::UnknownTicket(ticket))?;
        if let Some(user) = &owner {
            self.holdings
                .insert(user.clone(), Holding::Instance(id.clone()));
        }
        let recorded = owner.is_none() || owner.as_ref() == tagged;
        self.insert(
            id,
            Instance {
                phase: Phase::Launching,
                owner,
                recorded,
                stopped: false,
            },
        );
        Ok(())
    }

    /// The provider has recorded the owner of `id`: from now on the owner is told.
    pub fn recorded(&mut self, id: &InstanceId) -> Result<(), PoolError> {
        self.update(id, |instance| instance.recorded = true)
    }

    /// The launch of `ticket` failed, or was called off before it was sent. Its user, if any,
    /// holds nothing again.
    pub fn launch_failed(&mut self, ticket: Ticket) -> Option<UserId> {
        let owner = self.pending.remove(&ticket).flatten();
        if let Some(user) = &owner {
            if self.holdings.get(user) == Some(&Holding::Pending(ticket)) {
                self.holdings.remove(user);
            }
        }
        owner
    }

    /// The launch of `ticket` failed in a way that may have left an instance behind (the
    /// provider's answer was lost). Its user, if any, holds nothing again, but the launch keeps
    /// counting against `max` until [`Self::doubt_resolved`].
    pub fn launch_in_doubt(&mut self, ticket: Ticket) -> Option<UserId> {
        let owner = self.launch_failed(ticket);
        self.in_doubt.insert(ticket);
        owner
    }

    /// The instance of a launch in doubt was found (and is about to be adopted), or it is
    /// certain that there is none.
    pub fn doubt_resolved(&mut self, ticket: Ticket) -> bool {
        self.in_doubt.remove(&ticket)
    }

    /// The instance answers its readiness probe.
    pub fn mark_ready(&mut self, id: &InstanceId) -> Result<(), PoolError> {
        self.update(id, |instance| {
            if matches!(instance.phase, Phase::Launching | Phase::Resuming) {
                instance.phase = Phase::Ready;
            }
        })
    }

    /// The owner left it idle: it is stopped with their work kept. Only an owned, recorded
    /// instance that is not ending can be paused; returns whether it was.
    pub fn pause(&mut self, id: &InstanceId) -> Result<bool, PoolError> {
        self.update(id, |instance| {
            let pausable = instance.owner.is_some()
                && instance.recorded
                && matches!(
                    instance.phase,
                    Phase::Ready | Phase::Launching | Phase::Resuming
                );
            if pausable {
                instance.phase = Phase::Paused;
                instance.stopped = true;
            }
            pausable
        })
    }

    /// Starting a resuming instance failed: it is paused again, still its owner's.
    pub fn resume_failed(&mut self, id: &InstanceId) -> Result<(), PoolError> {
        self.update(id, |instance| {
            if instance.phase == Phase::Resuming {
                instance.phase = Phase::Paused;
                instance.stopped = true;
            }
        })
    }

    /// Begins the end of an instance: it is nobody's any more and is never handed out again
    /// (I2). Returns its owner. Calling it twice is harmless.
    pub fn release(&mut self, id: &InstanceId) -> Result<Option<UserId>, PoolError> {
        let owner = self.update(id, |instance| {
            instance.phase = Phase::Terminating;
            instance.owner.clone()
        })?;
        if let Some(user) = &owner {
            if self.holdings.get(user) == Some(&Holding::Instance(id.clone())) {
                self.holdings.remove(user);
            }
        }
        Ok(owner)
    }

    /// The instance is gone (terminated by us, or found dead at the provider).
    pub fn forget(&mut self, id: &InstanceId) -> Option<Instance> {
        let instance = self.remove(id)?;
        if let Some(user) = &instance.owner {
            if self.holdings.get(user) == Some(&Holding::Instance(id.clone())) {
                self.holdings.remove(user);
            }
        }
        Some(instance)
    }

    /// Takes in an instance found at the provider, after a restart or one the pool lost track
    /// of. An owned instance is kept unless its owner holds another one; a free one is kept
    /// while the pool is under its maximum.
    pub fn adopt(&mut self, id: InstanceId, owner: Option<UserId>, phase: Phase) -> Adoption {
        if self.instances.contains_key(&id) {
            return Adoption::Known;
        }
        match &owner {
            // Paused is only for someone's instance.
            None if phase == Phase::Paused => return Adoption::Surplus,
            Some(user) if self.holdings.contains_key(user) => return Adoption::Surplus,
            Some(user) => {
                self.holdings
                    .insert(user.clone(), Holding::Instance(id.clone()));
            }
            None if self.live() >= self.limits.max => return Adoption::Surplus,
            None => {}
        }
        self.insert(
            id,
            Instance {
                phase,
                owner,
                recorded: true,
                stopped: phase == Phase::Paused,
            },
        );
        Adoption::Adopted
    }

    fn new_ticket(&mut self, owner: Option<UserId>) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.pending.insert(ticket, owner);
        ticket
    }

    /// Checks I1 to I3 and the bookkeeping between the maps; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut owners = HashMap::new();
        for (id, instance) in &self.instances {
            if instance.owner.is_none() && !instance.recorded {
                return Err(format!("{id} has no owner waiting to be recorded"));
            }
            if let Some(user) = &instance.owner {
                if instance.phase != Phase::Terminating {
                    if let Some(other) = owners.insert(user.clone(), id.clone()) {
                        return Err(format!("I1: {user} holds {other} and {id}"));
                    }
                    if self.holdings.get(user) != Some(&Holding::Instance(id.clone())) {
                        return Err(format!(
                            "{user} owns {id} but holds {:?}",
                            self.holdings.get(user)
                        ));
                    }
                }
            }
        }
        for (ticket, owner) in &self.pending {
            if let Some(user) = owner {
                if owners.contains_key(user) {
                    return Err(format!(
                        "I1: {user} holds an instance and launch {ticket:?}"
                    ));
                }
                if self.holdings.get(user) != Some(&Holding::Pending(*ticket)) {
                    return Err(format!(
                        "{user} waits for {ticket:?} but holds {:?}",
                        self.holdings.get(user)
                    ));
                }
            }
        }
        for (user, holding) in &self.holdings {
            let consistent = match holding {
                Holding::Instance(id) => self
                    .instances
                    .get(id)
                    .is_some_and(|i| i.owner.as_ref() == Some(user)),
                Holding::Pending(t) => self.pending.get(t) == Some(&Some(user.clone())),
            };
            if !consistent {
                return Err(format!("holding of {user} points nowhere: {holding:?}"));
            }
        }
        for (id, instance) in &self.instances {
            let ready = self.free_ready.contains(id);
            let launching = self.free_launching.contains(id);
            let expected = (
                instance.is_free() && instance.phase == Phase::Ready,
                instance.is_free() && instance.phase == Phase::Launching,
            );
            if (ready, launching) != expected {
                return Err(format!(
                    "{id} ({instance:?}) is indexed as free ready {ready}, launching {launching}"
                ));
            }
        }
        if self.free_ready.len() + self.free_launching.len()
            != self.instances.values().filter(|i| i.is_free()).count()
        {
            return Err("the free index holds instances the pool does not".into());
        }
        let stopped = self.instances.values().filter(|i| i.stopped).count();
        if stopped != self.stopped {
            return Err(format!("{} stopped counted as {}", stopped, self.stopped));
        }
        for (id, instance) in &self.instances {
            if matches!(instance.phase, Phase::Paused | Phase::Resuming) && instance.owner.is_none()
            {
                return Err(format!("{id} is {:?} without an owner", instance.phase));
            }
            let stopped_phase = matches!(instance.phase, Phase::Paused | Phase::Terminating);
            if (instance.phase == Phase::Paused && !instance.stopped)
                || (instance.stopped && !stopped_phase)
            {
                return Err(format!(
                    "{id} is {:?}, stopped {}",
                    instance.phase, instance.stopped
                ));
            }
        }
        if self.live() > self.limits.max {
            return Err(format!(
                "I3: {} live > max {}",
                self.live(),
                self.limits.max
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(n: usize) -> UserId {
        UserId::parse(&format!("user-{n}")).unwrap()
    }

    fn id(n: u128) -> InstanceId {
        InstanceId::from_bits(n)
    }

    fn pool(min_free: usize, max: usize) -> Pool {
        Pool::new(Limits { min_free, max })
    }

    #[test]
    fn a_request_takes_a_ready_instance_before_a_launching_one() {
        let mut p = pool(2, 5);
        let tickets = p.top_up();
        assert_eq!(tickets.len(), 2);
        p.launched(tickets[0], id(1), None).unwrap();
        p.launched(tickets[1], id(2), None).unwrap();
        p.mark_ready(&id(2)).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Assigned(id(2))));
        assert_eq!(p.request(&user(2)), Ok(Grant::Assigned(id(1))));
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_lower_target_makes_ready_free_instances_surplus_never_starting_or_assigned_ones() {
        let mut p = pool(3, 5);
        let tickets = p.top_up();
        for (n, t) in tickets.iter().enumerate() {
            p.launched(*t, id(n as u128 + 1), None).unwrap();
        }
        p.mark_ready(&id(1)).unwrap();
        p.mark_ready(&id(2)).unwrap();
        assert!(p.surplus().is_empty());
        p.set_min_free(1);
        // Three free (two ready, one starting) for a target of one: the two ready go, the
        // highest id first.
        assert_eq!(p.surplus(), vec![id(2), id(1)]);
        assert_eq!(p.request(&user(1)), Ok(Grant::Assigned(id(1))));
        assert_eq!(p.surplus(), vec![id(2)]);
        // The target never passes the maximum.
        p.set_min_free(9);
        assert_eq!(p.min_free(), 5);
        assert!(p.surplus().is_empty());
        p.check_invariants().unwrap();
    }

    #[test]
    fn nobody_is_told_an_instance_before_its_owner_is_recorded() {
        let mut p = pool(1, 3);
        let tickets = p.top_up();
        p.launched(tickets[0], id(1), None).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Assigned(id(1))));
        // A double click while the tag is written waits for that write.
        assert_eq!(p.request(&user(1)), Ok(Grant::Recording(id(1))));
        p.recorded(&id(1)).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Held(id(1))));
        // Nor is an instance the user took over while its launch ran, whose launch tags
        // name nobody.
        let tickets = p.top_up();
        assert_eq!(p.request(&user(2)), Ok(Grant::Pending(tickets[0])));
        p.launched(tickets[0], id(2), None).unwrap();
        assert_eq!(p.request(&user(2)), Ok(Grant::Recording(id(2))));
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_request_without_free_instances_launches_for_the_user() {
        let mut p = pool(0, 1);
        let Ok(Grant::Launch(ticket)) = p.request(&user(1)) else {
            panic!("expected a launch")
        };
        assert_eq!(p.request(&user(1)), Ok(Grant::Pending(ticket)));
        assert_eq!(p.request(&user(2)), Err(PoolError::Full { max: 1 }));
        // The launch carried the owner's tag: recorded from the first moment.
        p.launched(ticket, id(7), Some(&user(1))).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Held(id(7))));
    }

    #[test]
    fn a_request_takes_over_a_free_pending_launch() {
        let mut p = pool(1, 1);
        let tickets = p.top_up();
        assert_eq!(p.request(&user(1)), Ok(Grant::Pending(tickets[0])));
        p.launched(tickets[0], id(3), None).unwrap();
        p.recorded(&id(3)).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Held(id(3))));
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_failed_launch_frees_its_user_to_ask_again() {
        let mut p = pool(0, 2);
        let Ok(Grant::Launch(ticket)) = p.request(&user(1)) else {
            panic!("expected a launch")
        };
        assert_eq!(p.launch_failed(ticket), Some(user(1)));
        assert!(matches!(p.request(&user(1)), Ok(Grant::Launch(_))));
    }

    #[test]
    fn a_released_instance_is_never_handed_out_again() {
        let mut p = pool(1, 3);
        let t = p.top_up();
        p.launched(t[0], id(1), None).unwrap();
        assert_eq!(p.request(&user(1)), Ok(Grant::Assigned(id(1))));
        assert_eq!(p.release(&id(1)), Ok(Some(user(1))));
        // Still counted until it is gone, and nobody gets it.
        assert_eq!(p.live(), 1);
        assert!(matches!(p.request(&user(2)), Ok(Grant::Launch(_))));
        assert!(p.forget(&id(1)).is_some());
        p.check_invariants().unwrap();
    }

    #[test]
    fn adoption_keeps_one_instance_per_user_and_respects_max() {
        let mut p = pool(0, 2);
        assert_eq!(
            p.adopt(id(1), Some(user(1)), Phase::Ready),
            Adoption::Adopted
        );
        assert_eq!(p.adopt(id(1), Some(user(1)), Phase::Ready), Adoption::Known);
        assert_eq!(
            p.adopt(id(2), Some(user(1)), Phase::Ready),
            Adoption::Surplus
        );
        assert_eq!(p.adopt(id(3), None, Phase::Launching), Adoption::Adopted);
        assert_eq!(p.adopt(id(4), None, Phase::Launching), Adoption::Surplus);
        // An owned instance is kept even over max: it is somebody's session.
        assert_eq!(
            p.adopt(id(5), Some(user(2)), Phase::Ready),
            Adoption::Adopted
        );
        assert_eq!(p.request(&user(1)), Ok(Grant::Held(id(1))));
    }

    /// One step of the random walk: indexes pick among what exists at that moment.
    #[derive(Debug, Clone)]
    enum Step {
        Request(usize),
        TopUp,
        /// A pending launch ends; whether its launch tags named the ticket's user.
        Launched(usize, bool),
        /// The owner of an unrecorded instance is recorded.
        Recorded(usize),
        LaunchFailed(usize),
        /// An owned instance is paused; a resume fails.
        Pause(usize),
        ResumeFailed(usize),
        /// A launch whose answer was lost; then the doubt is resolved.
        LaunchInDoubt(usize),
        DoubtResolved(usize),
        Ready(usize),
        Release(usize),
        Forget(usize),
        /// An instance found at the provider: its owner, and whether it is ready.
        Adopt(Option<usize>, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..12usize).prop_map(Step::Request),
            2 => Just(Step::TopUp),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(n, tagged)| Step::Launched(n, tagged)),
            2 => any::<usize>().prop_map(Step::Recorded),
            1 => any::<usize>().prop_map(Step::LaunchFailed),
            1 => any::<usize>().prop_map(Step::LaunchInDoubt),
            2 => any::<usize>().prop_map(Step::Pause),
            1 => any::<usize>().prop_map(Step::ResumeFailed),
            1 => any::<usize>().prop_map(Step::DoubtResolved),
            2 => any::<usize>().prop_map(Step::Ready),
            1 => any::<usize>().prop_map(Step::Release),
            1 => any::<usize>().prop_map(Step::Forget),
            1 => (proptest::option::of(0..12usize), any::<bool>())
                .prop_map(|(u, ready)| Step::Adopt(u, ready)),
        ]
    }

    fn nth<T: Clone>(items: Vec<T>, n: usize) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[n % items.len()].clone())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn invariants_hold_after_every_step(
            min_free in 0..6usize,
            max in 1..10usize,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut p = pool(min_free, max);
            let mut next_id = 0u128;
            // Every instance that ever had an owner, with that owner: I2 says it never changes.
            let mut first_owner: HashMap<InstanceId, UserId> = HashMap::new();
            for s in steps {
                match s {
                    Step::Request(u) => {
                        let before = p.holding(&user(u)).cloned();
                        match p.request(&user(u)) {
                            Ok(Grant::Held(i)) => {
                                prop_assert!(p.instance(&i).is_some_and(|x| x.recorded));
                                prop_assert_eq!(before, Some(Holding::Instance(i)));
                            }
                            Ok(Grant::Recording(i)) => {
                                prop_assert!(p.instance(&i).is_some_and(|x| !x.recorded));
                                prop_assert_eq!(before, Some(Holding::Instance(i)));
                            }
                            // Only the owner of a paused instance resumes it, and only it.
                            Ok(Grant::Resume(i)) => {
                                prop_assert!(p.instance(&i).is_some_and(|x| x.phase == Phase::Resuming));
                                prop_assert_eq!(before, Some(Holding::Instance(i)));
                            }
                            Err(PoolError::FullForResume { id: i, .. }) => {
                                prop_assert!(p.instance(&i).is_some_and(|x| x.phase == Phase::Paused));
                                prop_assert_eq!(p.live(), max);
                            }
                            Ok(Grant::Pending(t)) => prop_assert!(
                                before.is_none() || before == Some(Holding::Pending(t))
                            ),
                            Ok(Grant::Assigned(_)) | Ok(Grant::Launch(_)) => prop_assert!(before.is_none()),
                            Err(PoolError::Full { .. }) => {
                                prop_assert!(before.is_none());
                                prop_assert_eq!(p.live(), max);
                                prop_assert_eq!(p.free(), 0);
                            }
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Step::TopUp => {
                        p.top_up();
                        // I4: free capacity reaches min_free as far as max allows.
                        prop_assert!(p.free() >= min_free || p.live() == max,
                            "free {} live {} min {} max {}", p.free(), p.live(), min_free, max);
                    }
                    Step::Launched(n, tagged) => {
                        if let Some(t) = nth(p.pending.keys().copied().collect(), n) {
                            next_id += 1;
                            let owner = p.ticket_owner(t).cloned().filter(|_| tagged);
                            p.launched(t, id(next_id), owner.as_ref()).unwrap();
                        }
                    }
                    Step::Recorded(n) => {
                        let unrecorded: Vec<InstanceId> = p.instances.iter()
                            .filter(|(_, i)| !i.recorded)
                            .map(|(i, _)| i.clone()).collect();
                        if let Some(i) = nth(unrecorded, n) {
                            p.recorded(&i).unwrap();
                        }
                    }
                    Step::LaunchFailed(n) => {
                        if let Some(t) = nth(p.pending.keys().copied().collect(), n) {
                            p.launch_failed(t);
                        }
                    }
                    Step::Pause(n) => {
                        let owned: Vec<InstanceId> = p.instances.iter()
                            .filter(|(_, i)| i.owner.is_some())
                            .map(|(i, _)| i.clone()).collect();
                        if let Some(i) = nth(owned, n) {
                            let live = p.live();
                            if p.pause(&i).unwrap() {
                                prop_assert_eq!(p.live(), live - 1, "a paused instance still counts");
                            }
                        }
                    }
                    Step::ResumeFailed(n) => {
                        let resuming: Vec<InstanceId> = p.instances.iter()
                            .filter(|(_, i)| i.phase == Phase::Resuming)
                            .map(|(i, _)| i.clone()).collect();
                        if let Some(i) = nth(resuming, n) {
                            p.resume_failed(&i).unwrap();
                        }
                    }
                    Step::LaunchInDoubt(n) => {
                        if let Some(t) = nth(p.pending.keys().copied().collect(), n) {
                            let live = p.live();
                            p.launch_in_doubt(t);
                            prop_assert_eq!(p.live(), live, "a launch in doubt stops counting");
                        }
                    }
                    Step::DoubtResolved(n) => {
                        if let Some(t) = nth(p.in_doubt.iter().copied().collect(), n) {
                            p.doubt_resolved(t);
                        }
                    }
                    Step::Ready(n) => {
                        if let Some(i) = nth(p.instances.keys().cloned().collect(), n) {
                            p.mark_ready(&i).unwrap();
                        }
                    }
                    Step::Release(n) => {
                        if let Some(i) = nth(p.instances.keys().cloned().collect(), n) {
                            p.release(&i).unwrap();
                        }
                    }
                    Step::Forget(n) => {
                        let gone: Vec<InstanceId> = p.instances.iter()
                            .filter(|(_, i)| i.phase == Phase::Terminating)
                            .map(|(i, _)| i.clone()).collect();
                        if let Some(i) = nth(gone, n) {
                            p.forget(&i);
                        }
                    }
                    // An owned instance is adopted even over the maximum (the provider's
                    // word wins after a restart): only while there is room here.
                    Step::Adopt(u, ready) if u.is_none() || p.live() < max => {
                        next_id += 1;
                        let phase = if ready { Phase::Ready } else { Phase::Launching };
                        p.adopt(id(next_id), u.map(user), phase);
                    }
                    Step::Adopt(..) => {}
                }
                p.check_invariants().map_err(TestCaseError::fail)?;
                for (i, instance) in p.instances() {
                    if let Some(owner) = &instance.owner {
                        let first = first_owner.entry(i.clone()).or_insert_with(|| owner.clone());
                        prop_assert_eq!(&*first, owner, "I2: {} changed hands", i);
                    }
                }
                // A released instance never goes back to being free.
                for (i, instance) in p.instances() {
                    if first_owner.contains_key(i) {
                        prop_assert!(instance.owner.is_some());
                    }
                }
            }
        }
    }
}
