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
}

impl Ledger {
    pub fn new(tensors: Arc<SharedTensors>) -> Self {
        let pools = tensors
            .layout()
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Arc::new(ModelPool {
                    model: i as u16,
                    free: Arc::new(Semaphore::new(r.slots as usize)),
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

    /// Waits for a free slot of `model`. Bound the wait with a timeout.
    pub async fn lease(&self, model: u16) -> Result<SlotLease, ShmError> {
        let pool = self.pool(model)?;
        let permit = pool
            .free
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ShmError::NoSuchSlot { model, slot: 0 })?;
        self.finish_lease(pool, permit)
    }

    /// A free slot of `model` now, or `None`.
    pub fn try_lease(&self, model: u16) -> Result<Option<SlotLease>, ShmError> {
        let pool = self.pool(model)?;
        match pool.free.clone().try_acquire_owned() {
            Ok(permit) => self.finish_lease(pool, permit).map(Some),
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
}
