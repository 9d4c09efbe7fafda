//! The gpu-executor child: supervised like a worker, but one per gateway.
//! Each inference hands its slot lease to the link until the executor
//! answered or was reaped, so a slot is never reused while it may still be
//! read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shm::{
    ExecutorInit, FromExecutor, InferJob, ModelRuntime, RequestContext, Scores, SlotLease,
    ToExecutor,
};

use crate::children::{self, Exit, StartError};
use crate::core::Core;
use crate::error::{ApiError, Code};
use crate::link::ExecutorLink;
use crate::metrics::{DropReason, DropStage};

#[derive(Debug, Default)]
pub struct Executor {
    /// The running incarnation's link, while it is ready.
    link: RwLock<Option<Arc<ExecutorLink>>>,
    ready: AtomicBool,
    /// What runs each model, as the last executor to become ready said.
    runtimes: RwLock<Vec<ModelRuntime>>,
    next_job: AtomicU64,
}

impl Executor {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// What runs `model` (backend, precision, device), once an executor has
    /// loaded it.
    pub fn runtime(&self, model: &str) -> Option<ModelRuntime> {
        self.runtimes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|r| r.model == model)
            .cloned()
    }

    /// Runs the sample in `lease` through its model. An executor that does
    /// not answer within `executor.infer_timeout_ms` is killed and restarted.
    pub async fn infer(
        &self,
        ctx: &RequestContext,
        lease: SlotLease,
        pending: u32,
        within: Duration,
    ) -> Result<Scores, ApiError> {
        let link = self
            .link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ApiError::new(Code::NotReady, "the executor is restarting"))?;
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let slot = lease.slot();
        // The link keeps the lease until the executor answered or was reaped.
        let mut answer = link.expect(job_id, vec![lease]);
        let msg = ToExecutor::Infer(InferJob {
            job_id,
            ctx: ctx.clone(),
            slot,
            pending,
        });
        // On a send error the link is dying; its reaping ends the job.
        let _ = link.send(&msg);
        match tokio::time::timeout(within, answer.recv()).await {
            Ok(Some(FromExecutor::Scores(s))) => Ok(s),
            Ok(Some(FromExecutor::Failed { message, .. })) => Err(ApiError::new(
                Code::Internal,
                format!("the executor could not score this sample: {message}"),
            )),
            Ok(Some(FromExecutor::Expired { .. })) => Err(crate::score::deadline_exceeded()),
            Ok(_) => Err(crashed()),
            Err(_) => {
                link.kill(Exit::Timeout);
                Err(ApiError::new(
                    Code::ExecutorCrashed,
                    format!(
                        "the executor did not answer within {} ms; it is being restarted",
                        within.as_millis()
                    ),
                ))
            }
        }
    }

    /// Supervises the executor process until shutdown.
    pub async fn supervise(self: Arc<Self>, core: Arc<Core>) {
        children::keep_running(&core, "executor", "gpu-executor", || self.run_once(&core)).await;
    }

    async fn run_once(&self, core: &Arc<Core>) -> Result<Exit, StartError> {
        let fd = core
            .ledger
            .tensors()
            .fd()
            .try_clone_to_owned()
            .map_err(shm::ShmError::from)?;
        let bin = core.bin_dir.join("gpu-executor");
        let mut sp = children::spawn(&bin, vec![("--tensor-fd", fd)])?;
        let init = ToExecutor::Init(ExecutorInit {
            layout: core.ledger.tensors().layout().clone(),
            models: core.cfg.models.clone(),
            executor: core.cfg.executor.clone(),
            scheduling: core.cfg.scheduling.clone(),
        });
        let hs =
            children::handshake::<FromExecutor, _>(&mut sp.stream, &init, Duration::from_secs(300));
        let runtimes = match hs.await {
            Ok(FromExecutor::Ready(runtimes)) => runtimes,
            other => {
                children::reap(&mut sp.child).await;
                return Err(other.err().unwrap_or(StartError::Unexpected));
            }
        };
        for r in &runtimes {
            tracing::info!(
                pid = sp.pid,
                model = %r.model,
                backend = r.backend.as_str(),
                precision = r.precision.as_str(),
                device = %r.device,
                layout = %r.layout,
                fallbacks = ?r.fallbacks,
                "model serving"
            );
        }
        *self.runtimes.write().unwrap_or_else(|e| e.into_inner()) = runtimes;
        tracing::info!(pid = sp.pid, "gpu-executor ready");
        let (rd, wr) = sp.stream.into_split();
        let link = Arc::new(ExecutorLink::new(wr));
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
        self.ready.store(true, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["executor"])
            .set(1);

        let reason = link
            .run(&mut sp.child, rd, core.shutting_down(), |msg| {
                observe(core, msg)
            })
            .await;
        self.ready.store(false, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["executor"])
            .set(0);
        self.link.write().unwrap_or_else(|e| e.into_inner()).take();
        // Reap first: only then may the waiting jobs' slots be reused.
        link.finish(&mut sp.child, reason).await;
        Ok(reason)
    }
}

/// Counts and logs the executor's failures and drops, whether or not their
/// caller still waits.
fn observe(core: &Core, msg: &FromExecutor) {
    match msg {
        FromExecutor::Failed { job_id, message } => {
            tracing::error!(job_id, message, "executor failed a job");
        }
        FromExecutor::Expired { .. } => {
            core.metrics
                .drop_work(DropStage::Inference, DropReason::Deadline);
        }
        _ => {}
    }
}

fn crashed() -> ApiError {
    ApiError::new(
        Code::ExecutorCrashed,
        "the executor failed while running this request; retry it",
    )
}
