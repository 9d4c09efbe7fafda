//! Our side of one worker incarnation's socket: one writer, and a table of
//! jobs waiting for answers. A job gets a stream of messages (an image job
//! one, a video job a `Frame` per sampled frame and then its end).

use std::collections::HashMap;
use std::sync::Mutex;

use shm::{FromWorker, ToWorker};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Jobs sent and not yet finished; `None` once the worker is gone.
    waiting: Mutex<Option<HashMap<u64, mpsc::UnboundedSender<FromWorker>>>>,
    /// Cancelled when this worker is going away (killed for a deadline or a
    /// broken socket, or found dead): its dispatchers stop taking jobs.
    pub dying: CancellationToken,
}

impl Conn {
    pub fn new(writer: OwnedWriteHalf) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(writer),
            waiting: Mutex::new(Some(HashMap::new())),
            dying: CancellationToken::new(),
        }
    }

    /// Sends one message. Only dispatcher tasks call this, and they are
    /// never cancelled mid-send (only aborted once the worker is dead), so a
    /// frame is never left half written. A failed send means the worker is
    /// lost: it is killed, and the caller must hold its job's slots until
    /// the reaping.
    pub async fn send(&self, msg: &ToWorker) -> Result<(), shm::ShmError> {
        let r = shm::send(&mut *self.writer.lock().await, msg).await;
        if r.is_err() {
            self.kill();
        }
        r
    }

    /// Has the supervisor kill and replace this worker.
    pub fn kill(&self) {
        self.dying.cancel();
    }

    /// Closes our writing side so the worker sees EOF and exits.
    pub async fn close_writer(&self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.writer.lock().await.shutdown().await;
    }

    /// Registers `job_id`; its messages arrive on the returned stream, which
    /// ends when the job finished or the worker is gone.
    pub fn expect(&self, job_id: u64) -> mpsc::UnboundedReceiver<FromWorker> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(w) = self.lock().as_mut() {
            w.insert(job_id, tx);
        }
        rx
    }

    pub fn deliver(&self, msg: FromWorker) {
        let (id, last) = match &msg {
            FromWorker::Done(d) => (d.job_id, true),
            FromWorker::Failed { job_id, .. } => (*job_id, true),
            FromWorker::VideoDone(d) => (d.job_id, true),
            FromWorker::Frame(f) => (f.job_id, false),
            other => {
                tracing::warn!(?other, "unexpected message from a preprocess worker");
                return;
            }
        };
        let mut guard = self.lock();
        let Some(w) = guard.as_mut() else { return };
        let tx = if last {
            w.remove(&id)
        } else {
            w.get(&id).cloned()
        };
        drop(guard);
        if let Some(tx) = tx {
            let _ = tx.send(msg);
        }
    }

    /// Ends every job still waiting on this worker (it is gone).
    pub fn close(&self) {
        self.lock().take();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<u64, mpsc::UnboundedSender<FromWorker>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}
