//! The queue every stage of mmgate that can build up schedules from: the
//! gateway's preprocess queue and each model's batcher in the executor.
//!
//! - **Classes in strict order, with aging.** `critical` before `standard`
//!   before `batch`. A `batch` lane whose oldest job has waited `aging`
//!   competes as `standard`: the two lanes are then served by which has
//!   the older oldest job, so `batch` is never starved by `standard`.
//!   Nothing is promoted into `critical`, which keeps its latency.
//! - **Weighted fair queuing between tenants within a class**, by cost (an
//!   image costs 1, a video its sampled frames): self-clocked fair queuing
//!   (Golestani, 1994). A job's finish tag is `max(virtual time, its
//!   tenant's last tag) + cost / weight`; the lowest tag is served next, and
//!   the virtual time becomes its tag. A tenant that floods only queues
//!   behind itself: another tenant's next job is tagged from the virtual
//!   time, not behind the flood.
//!
//! The queue is a plain data structure; callers lock it and pass the time,
//! so its behaviour is a pure function of its inputs (and tested as one).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

pub use config::Class;

/// Fixed-point unit of virtual time: one unit of cost at weight 1.
const UNIT: u64 = 1 << 20;

/// Who a job is scheduled for, and what it costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub class: Class,
    pub tenant: String,
    /// The tenant's weight within its class (at least 1).
    pub weight: u32,
    /// Samples the job will run (at least 1).
    pub cost: u32,
}

/// A bounded (or unbounded) scheduling queue of `T`.
#[derive(Debug)]
pub struct FairQueue<T> {
    lanes: [Lane<T>; 3],
    /// A job is promoted one class per `aging` waited; zero = never.
    aging: Duration,
    capacity: Option<usize>,
    len: usize,
    seq: u64,
}

#[derive(Debug)]
struct Lane<T> {
    /// The finish tag of the job served last.
    vtime: u64,
    /// Per tenant: its last finish tag and its jobs queued here.
    tenants: HashMap<String, (u64, usize)>,
    /// Jobs by (finish tag, arrival order).
    by_tag: BTreeMap<(u64, u64), Queued<T>>,
    /// The same jobs by arrival order: (finish tag, arrival time).
    by_age: BTreeMap<u64, (u64, Instant)>,
}

#[derive(Debug)]
struct Queued<T> {
    item: T,
    tenant: String,
    arrived: Instant,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            vtime: 0,
            tenants: HashMap::new(),
            by_tag: BTreeMap::new(),
            by_age: BTreeMap::new(),
        }
    }
}

impl<T> Lane<T> {
    fn oldest(&self) -> Option<Instant> {
        self.by_age.first_key_value().map(|(_, &(_, t))| t)
    }

    /// Takes the job with the lowest finish tag.
    fn take(&mut self) -> Option<Queued<T>> {
        let key = *self.by_tag.first_key_value()?.0;
        self.take_key(key)
    }

    /// The key of the lowest-tagged job whose tenant `wanted` accepts.
    fn first_key_of(&self, wanted: &dyn Fn(&str) -> bool) -> Option<(u64, u64)> {
        self.by_tag
            .iter()
            .find(|(_, q)| wanted(&q.tenant))
            .map(|(k, _)| *k)
    }

    fn take_key(&mut self, key: (u64, u64)) -> Option<Queued<T>> {
        self.by_age.remove(&key.1);
        let q = self.by_tag.remove(&key)?;
        self.vtime = self.vtime.max(key.0);
        let vtime = self.vtime;
        if let Some((last, queued)) = self.tenants.get_mut(&q.tenant) {
            *queued -= 1;
            // A tenant with nothing queued whose tag the clock has passed
            // has no credit or debt left: forget it.
            if *queued == 0 && *last <= vtime {
                self.tenants.remove(&q.tenant);
            }
        }
        Some(q)
    }
}

impl<T> FairQueue<T> {
    /// A queue holding at most `capacity` jobs (`None` = unbounded), whose
    /// jobs are promoted one class per `aging` waited (zero = never).
    pub fn new(capacity: Option<usize>, aging: Duration) -> Self {
        Self {
            lanes: Default::default(),
            aging,
            capacity,
            len: 0,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item`, which arrived at `arrived`; gives it back when full.
    pub fn push(&mut self, item: T, ticket: &Ticket, arrived: Instant) -> Result<(), T> {
        if self.capacity.is_some_and(|c| self.len >= c) {
            return Err(item);
        }
        let lane = &mut self.lanes[ticket.class.rank()];
        let (last, queued) = lane.tenants.entry(ticket.tenant.clone()).or_insert((0, 0));
        let cost = u64::from(ticket.cost.max(1)) * UNIT / u64::from(ticket.weight.max(1));
        let tag = (*last).max(lane.vtime).saturating_add(cost.max(1));
        *last = tag;
        *queued += 1;
        self.seq += 1;
        lane.by_age.insert(self.seq, (tag, arrived));
        lane.by_tag.insert(
            (tag, self.seq),
            Queued {
                item,
                tenant: ticket.tenant.clone(),
                arrived,
            },
        );
        self.len += 1;
        Ok(())
    }

    /// The class lane `rank` competes as at `now`, and when its oldest job
    /// arrived: a lane other than `critical` is promoted one class per
    /// `aging` its oldest job waited, up to `standard`.
    fn standing(&self, rank: usize, now: Instant) -> Option<(usize, Instant)> {
        let oldest = self.lanes[rank].oldest()?;
        let waited = now.saturating_duration_since(oldest);
        let steps = if self.aging.is_zero() || rank == 0 {
            0
        } else {
            (waited.as_nanos() / self.aging.as_nanos()).min(rank as u128 - 1) as usize
        };
        Some((rank - steps, oldest))
    }

    /// The lane to serve next at `now`: the best class reached, then the
    /// older oldest job. Within the lane, jobs go by finish tag.
    fn next_lane(&self, now: Instant) -> Option<usize> {
        (0..self.lanes.len())
            .filter_map(|rank| Some((self.standing(rank, now)?, rank)))
            .min()
            .map(|(_, rank)| rank)
    }

    /// Where the job [`pop`](Self::pop) would take at `now` stands: the
    /// class it competes as and when its lane's oldest job arrived (to
    /// choose between two queues), and its own class.
    pub fn peek_class(&self, now: Instant) -> Option<((Class, Instant), Class)> {
        let rank = self.next_lane(now)?;
        let (reached, oldest) = self.standing(rank, now)?;
        Some(((Class::ALL[reached], oldest), Class::ALL[rank]))
    }

    /// The lane and key of the job that [`pop`](Self::pop) would take at
    /// `now`.
    fn next_key(&self, now: Instant) -> Option<(usize, (u64, u64))> {
        let rank = self.next_lane(now)?;
        Some((rank, *self.lanes[rank].by_tag.first_key_value()?.0))
    }

    /// The class and tenant of the job that [`pop`](Self::pop) would take
    /// at `now`.
    pub fn peek_owner(&self, now: Instant) -> Option<(Class, &str)> {
        let (rank, key) = self.next_key(now)?;
        let q = self.lanes[rank].by_tag.get(&key)?;
        Some((Class::ALL[rank], q.tenant.as_str()))
    }

    /// The job that [`pop`](Self::pop) would take at `now`.
    pub fn peek(&self, now: Instant) -> Option<&T> {
        let (rank, key) = self.next_key(now)?;
        self.lanes[rank].by_tag.get(&key).map(|q| &q.item)
    }

    /// The tenant of the job [`pop_where`](Self::pop_where) would take.
    pub fn peek_owner_where(
        &self,
        now: Instant,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Option<(Class, &str)> {
        let rank = self.next_lane(now)?;
        let lane = &self.lanes[rank];
        let key = lane.first_key_of(wanted)?;
        Some((Class::ALL[rank], lane.by_tag.get(&key)?.tenant.as_str()))
    }

    /// Takes the lowest-tagged job of the lane served next whose tenant
    /// `wanted` accepts (the class order stands; within the class a job of
    /// another tenant may go first), with the time it arrived.
    pub fn pop_where(
        &mut self,
        now: Instant,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Option<(T, Instant)> {
        let rank = self.next_lane(now)?;
        let key = self.lanes[rank].first_key_of(wanted)?;
        let q = self.lanes[rank].take_key(key)?;
        self.len -= 1;
        Some((q.item, q.arrived))
    }

    /// Takes the next job at `now`, with the time it arrived.
    pub fn pop(&mut self, now: Instant) -> Option<(T, Instant)> {
        let rank = self.next_lane(now)?;
        let q = self.lanes[rank].take()?;
        self.len -= 1;
        Some((q.item, q.arrived))
    }

    /// When the longest-waiting job of the given classes arrived.
    pub fn oldest_of(&self, classes: &[Class]) -> Option<Instant> {
        classes
            .iter()
            .filter_map(|c| self.lanes[c.rank()].oldest())
            .min()
    }

    /// When the longest-waiting job arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.oldest_of(&Class::ALL)
    }

    /// Takes every job, in no particular order.
    pub fn drain(&mut self) -> Vec<T> {
        self.len = 0;
        self.lanes
            .iter_mut()
            .flat_map(|lane| {
                lane.tenants.clear();
                lane.by_age.clear();
                std::mem::take(&mut lane.by_tag).into_values()
            })
            .map(|q| q.item)
            .collect()
    }
}

#[cfg(test)]
mod tests;
