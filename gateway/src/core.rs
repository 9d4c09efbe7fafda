//! The gateway's shared state: validated config, the slot ledger, metrics,
//! per-model counters, and the shutdown signal every task watches.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use config::{ModelSpec, ServerConfig};
use shm::{Ledger, PoolLayout, SharedTensors};
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Core {
    pub cfg: ServerConfig,
    pub ledger: Ledger,
    pub metrics: Metrics,
    /// Folder of `preprocess-worker` and `gpu-executor`.
    pub bin_dir: PathBuf,
    /// Per model: samples queued for or inside a preprocess worker.
    pending: Vec<AtomicU32>,
    shutdown: watch::Sender<bool>,
    draining: AtomicBool,
}

impl Core {
    pub fn new(cfg: ServerConfig, bin_dir: PathBuf) -> Result<Arc<Self>, shm::ShmError> {
        let sizes: Vec<(u32, usize)> = cfg
            .models
            .iter()
            .map(|m| (cfg.slots_for(m), m.slot_bytes()))
            .collect();
        let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&sizes))?);
        let pending = cfg.models.iter().map(|_| AtomicU32::new(0)).collect();
        Ok(Arc::new(Self {
            ledger: Ledger::with_reserve(tensors, cfg.critical_reserve() as usize),
            metrics: Metrics::new(),
            bin_dir,
            pending,
            shutdown: watch::channel(false).0,
            draining: AtomicBool::new(false),
            cfg,
        }))
    }

    pub fn model(&self, name: &str) -> Option<(u16, &ModelSpec)> {
        self.cfg
            .models
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name)
            .map(|(i, m)| (i as u16, m))
    }

    /// Marks one sample of `model` as in preprocessing until the guard drops.
    pub fn pending_guard(self: &Arc<Self>, model: u16) -> PendingGuard {
        self.pending[model as usize].fetch_add(1, Ordering::Relaxed);
        PendingGuard {
            core: self.clone(),
            model,
        }
    }

    pub fn pending(&self, model: u16) -> u32 {
        self.pending[model as usize].load(Ordering::Relaxed)
    }

    /// New requests are refused from now on; in-flight ones finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.is_shutting_down()
    }

    /// Stops the children (after the HTTP server drained).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when shutdown starts.
    pub async fn shutting_down(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Refreshes gauges that are read from state rather than counted.
    pub fn refresh_gauges(&self) {
        for (i, m) in self.cfg.models.iter().enumerate() {
            let free = self.ledger.free(i as u16) as i64;
            let cap = self.ledger.capacity(i as u16) as i64;
            let g = &self.metrics.shm_slots;
            g.with_label_values(&[m.name.as_str(), "free"]).set(free);
            g.with_label_values(&[m.name.as_str(), "leased"])
                .set(cap - free);
        }
    }
}

/// See [`Core::pending_guard`].
#[derive(Debug)]
pub struct PendingGuard {
    core: Arc<Core>,
    model: u16,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.core.pending[self.model as usize].fetch_sub(1, Ordering::Relaxed);
    }
}
