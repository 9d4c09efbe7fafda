//! The gpu-executor child: supervised like a worker, but one per gateway.
//! Each inference keeps its slot lease in the pending table until the
//! executor answered or died, so a slot is never reused while it may still
//! be read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use shm::{
    ExecutorInit, FromExecutor, InferJob, ModelRuntime, RequestContext, Scores, SlotLease,
    ToExecutor,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::children::{self, Exit, StartError};
use crate::core::Core;
use crate::error::{ApiError, Code};
use crate::metrics::{DropReason, DropStage};

/// Jobs sent and not answered, with the slot each keeps leased meanwhile.
type Waiting = HashMap<u64, (oneshot::Sender<Result<Scores, ApiError>>, SlotLease)>;

#[derive(Debug, Default)]
pub struct Executor {
    conn: RwLock<Option<Arc<Conn>>>,
    ready: AtomicBool,
    /// What runs each model, as the last executor to become ready said.
    runtimes: RwLock<Vec<ModelRuntime>>,
    next_job: AtomicU64,
}

/// One executor incarnation. Frames are written by one writer task, so a
/// request dropped mid-send can never leave half a frame on the socket.
#[derive(Debug)]
struct Conn {
    out: mpsc::UnboundedSender<ToExecutor>,
    waiting: Mutex<Option<Waiting>>,
    /// Cancelled to have the supervisor kill and restart the executor.
    kill: CancellationToken,
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
        let conn = self
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ApiError::new(Code::NotReady, "the executor is restarting"))?;
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let slot = lease.slot();
        let (tx, rx) = oneshot::channel();
        match conn
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(w) => w.insert(job_id, (tx, lease)),
            None => return Err(crashed()),
        };
        let msg = ToExecutor::Infer(InferJob {
            job_id,
            ctx: ctx.clone(),
            slot,
            pending,
        });
        // On a send error the executor is dying; its reaping fails the job.
        let _ = conn.out.send(msg);
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(crashed()),
            Err(_) => {
                conn.kill.cancel();
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
        let (mut rd, mut wr) = sp.stream.into_split();
        let (out, mut outbox) = mpsc::unbounded_channel::<ToExecutor>();
        let conn = Arc::new(Conn {
            out,
            waiting: Mutex::new(Some(HashMap::new())),
            kill: CancellationToken::new(),
        });
        let writer = tokio::spawn(async move {
            while let Some(msg) = outbox.recv().await {
                if shm::send(&mut wr, &msg).await.is_err() {
                    break;
                }
            }
            // Outbox closed (shutdown) or socket broken: EOF tells the executor.
            let _ = wr.shutdown().await;
        });
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        self.ready.store(true, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["executor"])
            .set(1);

        let reader = conn.clone();
        let metrics = core.clone();
        let reason = tokio::select! {
            _ = sp.child.wait() => Exit::Exited,
            _ = async move {
                while let Ok(Some(msg)) = shm::recv::<FromExecutor>(&mut rd).await {
                    reader.deliver(msg, &metrics);
                }
            } => Exit::SocketClosed,
            _ = conn.kill.cancelled() => Exit::Timeout,
            _ = core.shutting_down() => Exit::Shutdown,
        };
        self.ready.store(false, Ordering::Relaxed);
        core.metrics
            .children_ready
            .with_label_values(&["executor"])
            .set(0);
        self.conn.write().unwrap_or_else(|e| e.into_inner()).take();
        if reason == Exit::Shutdown {
            writer.abort();
            let _ = tokio::time::timeout(Duration::from_secs(2), sp.child.wait()).await;
        }
        writer.abort();
        // Reap first: only then may the waiting jobs' slots be reused.
        children::reap(&mut sp.child).await;
        conn.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(reason)
    }
}

impl Conn {
    fn deliver(&self, msg: FromExecutor, core: &Core) {
        let (id, answer) = match msg {
            FromExecutor::Scores(s) => (s.job_id, Ok(s)),
            FromExecutor::Failed { job_id, message } => {
                tracing::error!(job_id, message, "executor failed a job");
                let message = format!("the executor could not score this sample: {message}");
                (job_id, Err(ApiError::new(Code::Internal, message)))
            }
            FromExecutor::Expired { job_id } => {
                core.metrics
                    .drop_work(DropStage::Inference, DropReason::Deadline);
                (job_id, Err(crate::score::deadline_exceeded()))
            }
            other => {
                tracing::warn!(?other, "unexpected message from the executor");
                return;
            }
        };
        let entry = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|w| w.remove(&id));
        let Some((tx, lease)) = entry else { return };
        if let Ok(s) = &answer {
            let model = &core.cfg.models[lease.slot().model as usize].name;
            core.metrics
                .batch_size
                .with_label_values(&[model.as_str()])
                .observe(s.batch as f64);
        }
        let _ = tx.send(answer);
    }
}

fn crashed() -> ApiError {
    ApiError::new(
        Code::ExecutorCrashed,
        "the executor failed while running this request; retry it",
    )
}
