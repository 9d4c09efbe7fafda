//! The dynamic batcher of one model, as an actor: one tokio task owns the
//! queue and knows which engine instances are free; the IPC reader submits
//! jobs through a channel, instances report back through another.
//!
//! Triton-like policy: a batch leaves as soon as it reaches `max_batch` or a
//! preferred size, when its oldest sample has waited `max_queue_delay_us`,
//! or at once when the newest job says no more samples of this model are in
//! preprocessing (`pending == 0`). While every instance is busy, samples keep
//! accumulating (up to `max_batch` per batch).
//!
//! A model may have a latency lane, an instance over every core at normal
//! CPU priority ([`Engine::latency_lane`]): a batch found alone runs on
//! it, and under load critical samples and those of a tenant with nothing
//! running, while the other instances run below it. After such a
//! tenant's batch the lane rests from every standard sample for as long
//! as it ran, while the other instances have work ([`Actor::lane_rest`]).
//!
//! If every instance thread of the model is gone, the batcher fails each job
//! it gets and reports the loss once on its `lost` channel: the process
//! cannot serve that model any more and should exit so that it is restarted.

use std::sync::Arc;
use std::time::Duration;

use config::{BatchingSpec, ModelSpec};
use fair_queue::FairQueue;
use shm::{FromExecutor, InferJob, SharedTensors};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::instance::{Batch, Instance, ModelInfo, Queued};
use crate::{Engine, ExecError};

/// Jobs a batcher's inbox holds before `submit` waits. Each job holds a
/// tensor slot, so the gateway's pool already bounds the real depth.
const INBOX: usize = 1024;

/// How long traffic of another tenant, or of class critical, counts as
/// present after its last sample.
const RECENT: Duration = Duration::from_secs(1);

/// How long an instance is held for a sample announced by `Expect` (one
/// decode, with room): its `Infer` ends the hold earlier; a decode that
/// failed ends it here. Unit tests hold a second, so that a slow machine
/// cannot end a hold before the test has looked.
const EXPECT_FOR: Duration = Duration::from_millis(if cfg!(test) { 1000 } else { 50 });

/// What the batcher's inbox carries.
#[derive(Debug)]
enum Inbox {
    Job(InferJob),
    Expect(shm::Expect),
}

/// When to dispatch, as a pure function of the queue's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Preferred sizes, largest first.
    pub preferred: Vec<usize>,
}

impl BatchPolicy {
    pub fn from_spec(b: &BatchingSpec) -> Self {
        let max_batch = (b.max_batch as usize).max(1);
        let mut preferred: Vec<usize> = b
            .preferred_sizes
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| p >= 1 && p <= max_batch)
            .collect();
        preferred.sort_unstable_by(|a, b| b.cmp(a));
        preferred.dedup();
        Self {
            max_batch,
            max_delay: Duration::from_micros(b.max_queue_delay_us),
            preferred,
        }
    }

    /// How many of `queued` samples to dispatch now (to a free instance), or
    /// `None` to keep waiting. `flush` is set when no more samples are
    /// expected (the newest job's `pending` was 0, or the batcher is closing).
    pub fn ready(&self, queued: usize, oldest_wait: Duration, flush: bool) -> Option<usize> {
        if queued == 0 {
            return None;
        }
        if queued >= self.max_batch {
            return Some(self.max_batch);
        }
        if flush || oldest_wait >= self.max_delay {
            return Some(queued);
        }
        self.preferred.iter().copied().find(|&p| p <= queued)
    }
}

/// The IPC side's handle to a model's batcher.
#[derive(Debug)]
pub struct Batcher {
    inbox: mpsc::Sender<Inbox>,
    task: JoinHandle<()>,
}

impl Batcher {
    /// Starts one thread per engine and the batcher task (on the current
    /// tokio runtime). Answers for every job go to `answers`; `lost` gets
    /// one error if no instance is left to run this model.
    pub fn spawn(
        spec: &ModelSpec,
        engines: Vec<Box<dyn Engine>>,
        tensors: Arc<SharedTensors>,
        answers: mpsc::UnboundedSender<FromExecutor>,
        lost: mpsc::UnboundedSender<ExecError>,
        scheduling: &config::Scheduling,
    ) -> Result<Self, ExecError> {
        let model = Arc::new(ModelInfo::of(spec));
        let (free_tx, free_rx) = mpsc::unbounded_channel();
        let lane = engines.iter().position(|e| e.latency_lane());
        let instances = engines
            .into_iter()
            .enumerate()
            .map(|(id, engine)| {
                let (m, t, a, f) = (
                    model.clone(),
                    tensors.clone(),
                    answers.clone(),
                    free_tx.clone(),
                );
                Instance::spawn(id, m, engine, t, a, f).map(Some)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // With a lane, it is the headroom (`Scheduling::throughput_priority`).
        let (headroom, tenant_headroom) = match lane {
            Some(_) => (0, 0),
            None => (
                scheduling.critical_headroom as usize,
                scheduling.tenant_headroom as usize,
            ),
        };
        let (inbox, rx) = mpsc::channel(INBOX);
        let actor = Actor {
            policy: BatchPolicy::from_spec(&spec.batching),
            model: spec.name.clone(),
            free: (0..instances.len())
                .rev()
                .filter(|&i| Some(i) != lane)
                .collect(),
            solo: None,
            lane,
            lane_free: lane.is_some(),
            lane_rest_from: None,
            lane_rest: Instant::now(),
            instances,
            queue: FairQueue::new(None, Duration::from_millis(scheduling.aging_ms)),
            mix_tenants: scheduling.mix_tenants_in_batches,
            headroom,
            tenant_headroom,
            expected: Vec::new(),
            running: Vec::new(),
            last_owner: None,
            contended_until: Instant::now(),
            critical_until: Instant::now(),
            flush: false,
            answers,
            lost: Some(lost),
        };
        let task = tokio::spawn(actor.run(rx, free_rx));
        Ok(Self { inbox, task })
    }

    /// Queues a job; waits only if the inbox is full.
    pub async fn submit(&self, job: InferJob) -> Result<(), ExecError> {
        self.inbox
            .send(Inbox::Job(job))
            .await
            .map_err(|_| ExecError::Protocol("the batcher has stopped".into()))
    }

    /// A sample of `e.tenant` entered preprocessing (a hint: dropped when
    /// the inbox is full).
    pub fn expect(&self, e: shm::Expect) {
        let _ = self.inbox.try_send(Inbox::Expect(e));
    }

    /// Stops accepting jobs, runs what is queued and waits for the answers
    /// to be sent.
    pub async fn close(self) {
        drop(self.inbox);
        let _ = self.task.await;
    }
}

struct Actor {
    policy: BatchPolicy,
    model: String,
    /// `None` once an instance's thread is gone.
    instances: Vec<Option<Instance>>,
    /// Free instance ids, the latency lane's aside; the last one is used
    /// next.
    free: Vec<usize>,
    /// The instance running a batch alone (on every core), if one is: no
    /// other batch starts until it is done, or the two would share cores
    /// the lone batch was given.
    solo: Option<usize>,
    /// The latency lane instance ([`Engine::latency_lane`]), if the model
    /// has one: lone batches, critical samples, and under contention the
    /// samples of a tenant with nothing running go to it (unless it
    /// rests: [`Actor::lane_rest`]).
    lane: Option<usize>,
    lane_free: bool,
    /// When the lane's current batch started, if it makes the lane rest
    /// when it ends: it holds a standard sample and did not run alone.
    lane_rest_from: Option<Instant>,
    /// Until when the lane takes no `standard` sample while another
    /// instance runs a batch: as long as the lane's last standard batch
    /// beside other work ran. One rest for every tenant: a tenant that
    /// sends one sample at a time always has nothing running, and so would
    /// two that alternate; resting each alone, they could still hold the
    /// lane, at normal priority, against everyone else's share. So the
    /// light tenants together have at most half the lane's time while the
    /// throughput instances have work; critical samples never rest.
    lane_rest: Instant,
    /// Samples in scheduling order: class, then fair shares of tenants
    /// (the tensor pool bounds its depth).
    queue: FairQueue<InferJob>,
    /// Batches may hold several tenants' or classes' samples.
    mix_tenants: bool,
    /// Instances kept free for critical samples while they flow.
    headroom: usize,
    /// Instances kept free for announced samples of other tenants.
    tenant_headroom: usize,
    /// Samples announced by `Expect` whose `Infer` has not come: tenant,
    /// class, and when the hold for it ends.
    expected: Vec<(String, config::Class, Instant)>,
    /// The tenant whose batch each instance runs.
    running: Vec<Option<String>>,
    /// The (class, tenant) of the newest sample.
    last_owner: Option<(config::Class, String)>,
    /// Samples of more than one (class, tenant) came in the last
    /// [`RECENT`]: unless tenants mix, batches hold one sample, so none
    /// waits long for an instance busy with another's batch.
    contended_until: Instant,
    /// A critical sample came in the last [`RECENT`].
    critical_until: Instant,
    /// The newest job's `pending` was 0, or the inbox is closed.
    flush: bool,
    answers: mpsc::UnboundedSender<FromExecutor>,
    /// Taken when the loss of every instance is reported.
    lost: Option<mpsc::UnboundedSender<ExecError>>,
}

impl Actor {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Inbox>,
        mut free_rx: mpsc::UnboundedReceiver<usize>,
    ) {
        let mut open = true;
        let mut threads_alive = true;
        loop {
            self.dispatch();
            if !open && self.queue.is_empty() && self.busy() == 0 {
                break;
            }
            let deadline = self.deadline();
            tokio::select! {
                biased;
                id = free_rx.recv(), if threads_alive => match id {
                    Some(id) => {
                        if self.solo == Some(id) {
                            self.solo = None;
                        }
                        if let Some(tenant) = self.running.get_mut(id) {
                            *tenant = None;
                        }
                        if self.lane == Some(id) {
                            self.lane_free = true;
                            if let Some(since) = self.lane_rest_from.take() {
                                let now = Instant::now();
                                self.lane_rest = now + (now - since);
                            }
                        } else {
                            self.free.push(id);
                        }
                    }
                    None => {
                        // Every instance thread is gone (a panic escaped
                        // the instance's guard, e.g. from a panic payload's
                        // own drop).
                        threads_alive = false;
                        self.solo = None;
                        self.instances.iter_mut().for_each(|i| *i = None);
                        self.free.clear();
                        self.lane_free = false;
                    }
                },
                job = inbox.recv(), if open => match job {
                    Some(Inbox::Job(job)) => {
                        self.flush = job.pending == 0;
                        self.enqueue(job, Instant::now());
                    }
                    Some(Inbox::Expect(e)) => self.announce(e, Instant::now()),
                    None => {
                        open = false;
                        self.flush = true;
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => {}
            }
        }
        // Close every instance and wait for its thread, so engines are
        // dropped before the process exits.
        let threads: Vec<_> = self
            .instances
            .drain(..)
            .flatten()
            .map(Instance::close)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    /// When the oldest sample's delay runs out, if a free instance could
    /// take it then.
    fn deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        if self.solo.is_some() {
            return None;
        }
        if self.free.is_empty() && !self.lane_has_work(now) {
            // A standard sample may take the lane when its rest ends.
            return self
                .lane_ready()
                .map(|_| self.lane_rest)
                .filter(|until| *until > now && !self.queue.is_empty());
        }
        if self.held_for_critical(now) {
            return Some(self.critical_until);
        }
        if let Some(until) = self.held_for_expected(now) {
            return Some(until);
        }
        if self.flush {
            return None;
        }
        self.queue
            .oldest()
            .map(|t| Instant::from_std(t) + self.policy.max_delay)
    }

    /// Whether the next batch must wait because it is not critical and
    /// would take an instance kept free for critical samples.
    fn held_for_critical(&self, now: Instant) -> bool {
        let live = self.instances.iter().flatten().count();
        self.headroom > 0
            && live > self.headroom
            && now < self.critical_until
            && self.free.len() <= self.headroom
            && self
                .queue
                .peek_owner(now.into_std())
                .is_some_and(|(class, _)| class != config::Class::Critical)
    }

    /// While the last `tenant_headroom` instances are free, the tenants
    /// already running on the others: those instances go to someone else
    /// first (empty when the headroom is off or not reached).
    fn busy_tenants(&self) -> Vec<&str> {
        let live = self.instances.iter().flatten().count();
        if self.tenant_headroom == 0
            || live <= self.tenant_headroom
            || self.free.len() > self.tenant_headroom
        {
            return Vec::new();
        }
        self.running.iter().flatten().map(String::as_str).collect()
    }

    /// Whether the next batch must wait because only tenants already
    /// running have samples queued, and a sample of another tenant (of
    /// their class or a higher one) is in preprocessing; when that hold
    /// ends.
    fn held_for_expected(&self, now: Instant) -> Option<Instant> {
        let busy = self.busy_tenants();
        if busy.is_empty() {
            return None;
        }
        let at = now.into_std();
        let idle = |t: &str| !busy.contains(&t);
        if self.queue.peek_owner_where(at, &idle).is_some() {
            return None;
        }
        let (class, _) = self.queue.peek_owner(at)?;
        self.expected
            .iter()
            .filter(|(t, c, until)| *until > now && idle(t) && c.rank() <= class.rank())
            .map(|(_, _, until)| *until)
            .min()
    }

    /// Records a sample in preprocessing (the gateway announces them while
    /// `tenant_headroom` is on): held for by [`Self::held_for_expected`]
    /// without a lane, and a batch is not alone while one is coming.
    fn announce(&mut self, e: shm::Expect, now: Instant) {
        self.expected.retain(|(_, _, until)| *until > now);
        // Bounded: one entry per sample in preprocessing at most.
        if self.expected.len() < INBOX {
            self.expected.push((e.tenant, e.class, now + EXPECT_FOR));
        }
    }

    fn enqueue(&mut self, job: InferJob, arrived: Instant) {
        let now = Instant::now();
        if let Some(i) = self
            .expected
            .iter()
            .position(|(t, _, _)| *t == job.ctx.tenant)
        {
            self.expected.swap_remove(i);
        }
        let owner = (job.ctx.class, job.ctx.tenant.as_str());
        if owner.0 == config::Class::Critical {
            self.critical_until = now + RECENT;
        }
        match &mut self.last_owner {
            Some((c, t)) if (*c, t.as_str()) != owner => {
                self.contended_until = now + RECENT;
                // The name's buffer is reused: no allocation per sample.
                *c = owner.0;
                t.clear();
                t.push_str(owner.1);
            }
            Some(_) => {}
            None => self.last_owner = Some((owner.0, owner.1.to_string())),
        }
        let ticket = job.ctx.ticket();
        // Unbounded: never gives the job back.
        let _ = self.queue.push(job, &ticket, arrived.into_std());
    }

    /// Batches running now, on any instance.
    fn busy(&self) -> usize {
        let live = self.instances.iter().flatten().count();
        live.saturating_sub(self.free.len() + usize::from(self.lane_ready().is_some()))
    }

    /// The latency lane, when it is free and its thread alive.
    fn lane_ready(&self) -> Option<usize> {
        self.lane
            .filter(|&l| self.lane_free && self.instances.get(l).is_some_and(Option::is_some))
    }

    /// Which of the queued samples the lane takes besides a lone batch: in
    /// class critical, any; in class standard, while several owners are
    /// active, those of a tenant with nothing running (the light tenant
    /// beside a flood), unless the lane rests ([`Actor::lane_rest`]);
    /// never batch. `None` when the class served next gives it nothing. Once no
    /// other instance is left, everything.
    fn lane_takes(&self, now: Instant) -> Option<LaneTakes> {
        let (class, _) = self.queue.peek_owner(now.into_std())?;
        let others = self
            .instances
            .iter()
            .enumerate()
            .any(|(i, x)| x.is_some() && Some(i) != self.lane);
        let any = LaneTakes { busy: Vec::new() };
        if !others {
            return Some(any);
        }
        match class {
            config::Class::Critical => Some(any),
            config::Class::Standard if now < self.contended_until && !self.lane_resting(now) => {
                Some(LaneTakes {
                    busy: self.running.iter().flatten().cloned().collect(),
                })
            }
            _ => None,
        }
    }

    /// Whether the lane rests from standard samples now: its rest has not
    /// ended and another instance runs a batch (whose share it protects).
    fn lane_resting(&self, now: Instant) -> bool {
        now < self.lane_rest
            && self
                .running
                .iter()
                .enumerate()
                .any(|(i, t)| t.is_some() && Some(i) != self.lane)
    }

    /// Whether the lane is free and a queued sample is for it.
    fn lane_has_work(&self, now: Instant) -> bool {
        self.lane_ready().is_some()
            && self.lane_takes(now).is_some_and(|t| {
                self.queue
                    .peek_owner_where(now.into_std(), &|tenant| t.wants(tenant))
                    .is_some()
            })
    }

    /// Sends batches to free instances while the policy says so.
    fn dispatch(&mut self) {
        loop {
            if self.instances.iter().all(Option::is_none) {
                return self.no_instance_left();
            }
            if self.solo.is_some() {
                return;
            }
            let now = Instant::now();
            let oldest = self
                .queue
                .oldest()
                .map_or(Duration::ZERO, |t| now.into_std() - t);
            if self.lane_has_work(now) {
                let Some(n) = self.batch_size(oldest, now) else {
                    return;
                };
                let takes = self.lane_takes(now).expect("checked by lane_has_work");
                let idle = self.busy() == 0;
                let jobs = self.take_batch(n, now, &|t| takes.wants(t));
                let lane = self.lane.expect("the lane is ready");
                self.send(lane, jobs, now, idle);
                continue;
            }
            let Some(&id) = self.free.last() else {
                return;
            };
            if self.held_for_critical(now) || self.held_for_expected(now).is_some() {
                return;
            }
            let Some(n) = self.batch_size(oldest, now) else {
                return;
            };
            let idle = self.busy() == 0;
            self.free.pop();
            if self.instances[id].is_none() {
                continue;
            }
            // On reserved instances, a tenant not running yet goes first.
            let busy: Vec<String> = self.busy_tenants().into_iter().map(String::from).collect();
            let jobs = self.take_batch(n, now, &|t| !busy.iter().any(|b| b == t));
            self.send(id, jobs, now, idle);
        }
    }

    /// How many samples the next batch may hold, or `None` to wait.
    fn batch_size(&self, oldest: Duration, now: Instant) -> Option<usize> {
        let n = self.policy.ready(self.queue.len(), oldest, self.flush)?;
        Some(if !self.mix_tenants && now < self.contended_until {
            1
        } else {
            n
        })
    }

    /// Hands `jobs` to instance `id` (taken off the free list), or to the
    /// latency lane instead when the batch is alone: nothing else running
    /// (`idle`, from before `id` was taken), queued, or in preprocessing.
    /// Not while critical samples flow, unless it is theirs: one could
    /// come any moment, and nothing starts beside a batch that runs alone.
    fn send(&mut self, id: usize, jobs: Vec<Queued>, now: Instant, idle: bool) {
        let critical = jobs
            .first()
            .is_some_and(|q| q.job.ctx.class == config::Class::Critical);
        // With a lane, critical samples go to it: it stays theirs.
        let guard_critical = self.headroom > 0 || self.lane.is_some();
        let alone = idle
            && self.flush
            && self.queue.is_empty()
            && (critical || !guard_critical || now >= self.critical_until)
            && !self.expected.iter().any(|(_, _, until)| *until > now);
        let id = match self.lane_ready() {
            Some(lane) if alone && lane != id => {
                self.free.push(id);
                lane
            }
            _ => id,
        };
        if Some(id) == self.lane {
            self.lane_free = false;
            let standard = jobs
                .iter()
                .any(|q| q.job.ctx.class == config::Class::Standard);
            self.lane_rest_from = (standard && !alone).then_some(now);
        }
        if alone {
            self.solo = Some(id);
        }
        if self.running.len() < self.instances.len() {
            self.running.resize(self.instances.len(), None);
        }
        self.running[id] = jobs.first().map(|q| q.job.ctx.tenant.clone());
        let sent = match &self.instances[id] {
            Some(instance) => instance.dispatch(Batch { jobs, alone }),
            None => Err(jobs),
        };
        if let Err(jobs) = sent {
            self.solo = None;
            self.running[id] = None;
            tracing::error!(model = %self.model, instance = id, "instance thread is gone");
            self.instances[id] = None;
            for q in jobs {
                let arrived = now - Duration::from_micros(q.queue_us);
                self.enqueue(q.job, arrived);
            }
        }
    }

    /// Up to `n` samples in scheduling order; unless tenants may mix, only
    /// those of the first one's tenant and class (the batch ends at the
    /// first sample of another).
    /// Up to `n` samples of one owner (unless tenants mix), from a tenant
    /// `wanted` accepts when it has any queued, else from whoever is next.
    fn take_batch(&mut self, n: usize, now: Instant, wanted: &dyn Fn(&str) -> bool) -> Vec<Queued> {
        let at = now.into_std();
        let wanted: &dyn Fn(&str) -> bool = if self.queue.peek_owner_where(at, wanted).is_some() {
            wanted
        } else {
            &|_| true
        };
        let mut jobs: Vec<Queued> = Vec::with_capacity(n);
        while jobs.len() < n {
            let Some((class, tenant)) = self.queue.peek_owner_where(at, wanted) else {
                break;
            };
            // The batch's owner is its first sample's.
            let other = jobs
                .first()
                .is_some_and(|q| (q.job.ctx.class, q.job.ctx.tenant.as_str()) != (class, tenant));
            if other && !self.mix_tenants {
                break;
            }
            let Some((job, arrived)) = self.queue.pop_where(at, wanted) else {
                break;
            };
            jobs.push(Queued {
                job,
                queue_us: (at - arrived).as_micros() as u64,
            });
        }
        jobs
    }

    /// Fails what is queued and, the first time, reports the loss.
    fn no_instance_left(&mut self) {
        if let Some(lost) = self.lost.take() {
            tracing::error!(model = %self.model, "every instance thread exited");
            let _ = lost.send(ExecError::Instance {
                model: self.model.clone(),
                message: "every instance thread exited; no instances left".into(),
            });
        }
        self.fail_queued("no engine instance is running");
    }

    fn fail_queued(&mut self, message: &str) {
        for job in self.queue.drain() {
            let _ = self.answers.send(FromExecutor::Failed {
                job_id: job.job_id,
                message: format!("model {}: {message}", self.model),
            });
        }
    }
}

/// The lane's pick among queued samples ([`Actor::lane_takes`]).
struct LaneTakes {
    /// Tenants with a batch running (empty: any tenant).
    busy: Vec<String>,
}

impl LaneTakes {
    fn wants(&self, tenant: &str) -> bool {
        !self.busy.iter().any(|b| b == tenant)
    }
}

#[cfg(test)]
#[path = "batcher_tests.rs"]
pub(crate) mod tests;
