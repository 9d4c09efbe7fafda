//! The gateway's ledger: the one authority on which tensor slot is free.
//! A [`SlotLease`] is an RAII guard; the slot goes back to the free list when
//! the lease is dropped, and its next lease carries a new generation.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{SharedTensors, ShmError, SlotRef};

#[derive(Debug)]
pub struct Ledger {
    tensors: Arc<SharedTensors>,
    pools: Vec<Arc<ModelPool>>,
}

#[derive(Debug)]
struct ModelPool {
    model: u16,
    free: Arc<Semaphore>,
    /// Slots any lease may take: all but those reserved for critical work.
    general: Arc<Semaphore>,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    free: Vec<u32>,
    next_generation: u64,
}

/// One leased slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct SlotLease {
    pool: Arc<ModelPool>,
    slot: SlotRef,
    _permit: OwnedSemaphorePermit,
    /// Held by a lease that is not critical.
    _general: Option<OwnedSemaphorePermit>,
}

impl Ledger {
    pub fn new(tensors: Arc<SharedTensors>) -> Self {
        Self::with_reserve(tensors, 0)
    }

    /// A ledger keeping `reserve` slots of each model (at most half of
    /// them) for [`lease_critical`](Self::lease_critical): critical work
    /// finds a slot even while other work holds all the rest.
    pub fn with_reserve(tensors: Arc<SharedTensors>, reserve: usize) -> Self {
        let pools = tensors
            .layout()
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let slots = r.slots as usize;
                Arc::new(ModelPool {
                    model: i as u16,
                    free: Arc::new(Semaphore::new(slots)),
                    general: Arc::new(Semaphore::new(slots - reserve.min(slots / 2))),
                    state: Mutex::new(PoolState {
                        free: (0..r.slots).rev().collect(),
                        next_generation: 1,
                    }),
                })
            })
            .collect();
        Self { tensors, pools }
    }

    pub fn tensors(&self) -> &Arc<SharedTensors> {
        &self.tensors
    }

    /// Waits for a free slot of `model` that is not reserved. Bound the
    /// wait with a timeout.
    pub async fn lease(&self, model: u16) -> Result<SlotLease, ShmError> {
        let pool = self.pool(model)?;
        let closed = |_| ShmError::NoSuchSlot { model, slot: 0 };
        let general = pool.general.clone().acquire_owned().await.map_err(closed)?;
        let permit = pool.free.clone().acquire_owned().await.map_err(closed)?;
        self.finish_lease(pool, permit, Some(general))
    }

    /// Waits for any free slot of `model`, the reserved ones included.
    pub async fn lease_critical(&self, model: u16) -> Result<SlotLease, ShmError> {
        let pool = self.pool(model)?;
        let permit = pool
            .free
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ShmError::NoSuchSlot { model, slot: 0 })?;
        self.finish_lease(pool, permit, None)
    }

    /// [`lease_critical`](Self::lease_critical) for critical work, else
    /// [`lease`](Self::lease).
    pub async fn lease_for(&self, model: u16, critical: bool) -> Result<SlotLease, ShmError> {
        if critical {
            self.lease_critical(model).await
        } else {
            self.lease(model).await
        }
    }

    /// A free slot of `model` that is not reserved now, or `None`.
    pub fn try_lease(&self, model: u16) -> Result<Option<SlotLease>, ShmError> {
        let pool = self.pool(model)?;
        let Ok(general) = pool.general.clone().try_acquire_owned() else {
            return Ok(None);
        };
        match pool.free.clone().try_acquire_owned() {
            Ok(permit) => self.finish_lease(pool, permit, Some(general)).map(Some),
            Err(_) => Ok(None),
        }
    }

    fn pool(&self, model: u16) -> Result<&Arc<ModelPool>, ShmError> {
        self.pools
            .get(model as usize)
            .ok_or(ShmError::NoSuchSlot { model, slot: 0 })
    }

    fn finish_lease(
        &self,
        pool: &Arc<ModelPool>,
        permit: OwnedSemaphorePermit,
        general: Option<OwnedSemaphorePermit>,
    ) -> Result<SlotLease, ShmError> {
        let slot = {
            let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
            let slot = st.free.pop().expect("a permit guarantees a free slot");
            let generation = st.next_generation;
            st.next_generation += 1;
            SlotRef {
                model: pool.model,
                slot,
                generation,
            }
        };
        let lease = SlotLease {
            pool: pool.clone(),
            slot,
            _permit: permit,
            _general: general,
        };
        self.tensors.stamp(slot)?;
        Ok(lease)
    }

    /// Free slots of `model`.
    pub fn free(&self, model: u16) -> usize {
        self.pools
            .get(model as usize)
            .map_or(0, |p| p.free.available_permits())
    }

    /// Total slots of `model`.
    pub fn capacity(&self, model: u16) -> usize {
        self.tensors
            .layout()
            .regions
            .get(model as usize)
            .map_or(0, |r| r.slots as usize)
    }
}

impl SlotLease {
    pub fn slot(&self) -> SlotRef {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        st.free.push(self.slot.slot);
        // The permit is released after this, so a waiter always finds the slot.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolLayout;

    #[tokio::test]
    async fn leases_are_exclusive_and_come_back_with_a_new_generation() {
        let t = Arc::new(SharedTensors::create(PoolLayout::new(&[(2, 16)])).unwrap());
        let l = Ledger::new(t);
        let a = l.lease(0).await.unwrap();
        let b = l.try_lease(0).unwrap().unwrap();
        assert_ne!(a.slot().slot, b.slot().slot);
        assert!(l.try_lease(0).unwrap().is_none());
        assert_eq!(l.free(0), 0);
        let old = a.slot();
        drop(a);
        assert_eq!(l.free(0), 1);
        let c = l.lease(0).await.unwrap();
        assert_eq!(c.slot().slot, old.slot);
        assert!(c.slot().generation > old.generation);
        // The stale handle can no longer write into the slot.
        assert!(l.tensors().write_f32(old, |_| ()).is_err());
        drop((b, c));
        assert_eq!(l.free(0), l.capacity(0));
    }

    #[tokio::test]
    async fn reserved_slots_go_to_critical_leases_only() {
        let t = Arc::new(SharedTensors::create(PoolLayout::new(&[(4, 16)])).unwrap());
        let l = Ledger::with_reserve(t, 1);
        let general: Vec<_> = (0..3).map(|_| l.try_lease(0).unwrap().unwrap()).collect();
        assert!(
            l.try_lease(0).unwrap().is_none(),
            "the last slot is reserved"
        );
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), l.lease(0));
        assert!(waiting.await.is_err(), "a general lease waits");
        let critical = l.lease_critical(0).await.unwrap();
        assert_eq!(l.free(0), 0);
        drop(critical);
        drop(general);
        // The reserve is capped at half the slots.
        let t = Arc::new(SharedTensors::create(PoolLayout::new(&[(2, 16)])).unwrap());
        let l = Ledger::with_reserve(t, 5);
        assert!(l.try_lease(0).unwrap().is_some());
    }
}
