//! Starting a child process: a socketpair for its IPC, shared-memory fds
//! mapped to fixed numbers, and the hello → init → ready handshake.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::core::Core;

/// A started child and our end of its socket.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    pub stream: UnixStream,
    pub pid: u32,
}

/// Why a child could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("{0}")]
    Ipc(#[from] shm::ShmError),
    #[error("child said: {0}")]
    Fatal(String),
    #[error("child did not {0} in time")]
    Timeout(&'static str),
    #[error("child closed its socket during start-up")]
    Closed,
    #[error("child speaks protocol {0}, the gateway {PROTO}", PROTO = shm::PROTO_VERSION)]
    Protocol(u32),
    #[error("unexpected message during start-up")]
    Unexpected,
}

/// Starts `bin` with `--ipc-fd 3`, each of `fds` as `<flag> <n>` (n = 4, 5…),
/// `--parent-pid` and `--cpus` (a CPU list to pin to, when not empty),
/// stdin closed, killed if the handle is dropped.
pub fn spawn(bin: &Path, fds: Vec<(&str, OwnedFd)>, cpus: &str) -> Result<Spawned, StartError> {
    let err = |source| StartError::Spawn {
        bin: bin.display().to_string(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(err)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--ipc-fd").arg("3");
    let mut maps = vec![FdMapping {
        parent_fd: theirs.into(),
        child_fd: 3,
    }];
    for (i, (flag, fd)) in fds.into_iter().enumerate() {
        let n = 4 + i as i32;
        cmd.arg(flag).arg(n.to_string());
        maps.push(FdMapping {
            parent_fd: fd,
            child_fd: n,
        });
    }
    cmd.arg("--parent-pid").arg(std::process::id().to_string());
    if !cpus.is_empty() {
        cmd.arg("--cpus").arg(cpus);
    }
    cmd.fd_mappings(maps)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    // Children decode hostile input: they get no secret of the gateway's.
    cmd.env_remove("MMGATE_ADMIN_KEY");
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let child = cmd.spawn().map_err(err)?;
    let pid = child.id().unwrap_or(0);
    ours.set_nonblocking(true).map_err(err)?;
    let stream = UnixStream::from_std(ours).map_err(err)?;
    Ok(Spawned { child, stream, pid })
}

/// Why one incarnation of a child ended: the `reason` label of
/// `mmgate_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The process exited (or was killed from outside).
    Exited,
    /// Its socket closed or broke.
    SocketClosed,
    /// The gateway killed it: a worker over its decode deadline or whose
    /// socket write failed.
    Killed,
    /// The gateway killed it: the executor did not answer within
    /// `executor.infer_timeout_ms`.
    Timeout,
    /// The gateway killed it: the executor missed
    /// `executor.heartbeat_misses` heartbeats in a row (hung or stopped).
    Unresponsive,
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway retired it: the pool was scaled down, or a child with a
    /// new configuration took over. Not restarted.
    Retired,
    /// It could not be started or did not become ready.
    StartFailed,
}

impl Exit {
    pub fn as_str(self) -> &'static str {
        match self {
            Exit::Exited => "exited",
            Exit::SocketClosed => "socket_closed",
            Exit::Killed => "killed",
            Exit::Timeout => "timeout",
            Exit::Unresponsive => "missed_heartbeats",
            Exit::Shutdown => "shutdown",
            Exit::Retired => "retired",
            Exit::StartFailed => "start_failed",
        }
    }
}

/// What a child's first messages look like, for the generic handshake.
pub trait ChildProtocol: DeserializeOwned {
    fn hello(&self) -> Option<&shm::Hello>;
    fn is_ready(&self) -> bool;
    fn fatal(&self) -> Option<&str>;
}

impl ChildProtocol for shm::FromWorker {
    fn hello(&self) -> Option<&shm::Hello> {
        match self {
            shm::FromWorker::Hello(h) => Some(h),
            _ => None,
        }
    }
    fn is_ready(&self) -> bool {
        matches!(self, shm::FromWorker::Ready)
    }
    fn fatal(&self) -> Option<&str> {
        match self {
            shm::FromWorker::Fatal(m) => Some(m),
            _ => None,
        }
    }
}

impl ChildProtocol for shm::FromExecutor {
    fn hello(&self) -> Option<&shm::Hello> {
        match self {
            shm::FromExecutor::Hello(h) => Some(h),
            _ => None,
        }
    }
    fn is_ready(&self) -> bool {
        matches!(self, shm::FromExecutor::Ready(_))
    }
    fn fatal(&self) -> Option<&str> {
        match self {
            shm::FromExecutor::Fatal(m) => Some(m),
            _ => None,
        }
    }
}

/// Waits for the child's hello, sends `init`, waits for Ready and returns it.
pub async fn handshake<In: ChildProtocol, Out: Serialize>(
    stream: &mut UnixStream,
    init: &Out,
    ready_within: Duration,
) -> Result<In, StartError> {
    let first: In = recv_within(stream, Duration::from_secs(10), "say hello").await?;
    let hello = first.hello().ok_or(StartError::Unexpected)?;
    if hello.proto_version != shm::PROTO_VERSION {
        return Err(StartError::Protocol(hello.proto_version));
    }
    shm::send(stream, init).await?;
    let next: In = recv_within(stream, ready_within, "become ready").await?;
    if let Some(m) = next.fatal() {
        return Err(StartError::Fatal(m.to_string()));
    }
    if !next.is_ready() {
        return Err(StartError::Unexpected);
    }
    Ok(next)
}

async fn recv_within<In: DeserializeOwned>(
    stream: &mut UnixStream,
    within: Duration,
    what: &'static str,
) -> Result<In, StartError> {
    match tokio::time::timeout(within, shm::recv::<In>(stream)).await {
        Err(_) => Err(StartError::Timeout(what)),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(StartError::Closed),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Keeps one child running until shutdown or until `retire` is cancelled
/// and its incarnation ended: `incarnation` starts it, serves it and says
/// why it ended; each restart is counted in
/// `mmgate_worker_restarts_total{pool,reason}` (a retirement too, under
/// `retired`) and backed off.
pub async fn keep_running<F, Fut>(
    core: &Core,
    pool: &'static str,
    child: &str,
    retire: &CancellationToken,
    mut incarnation: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Exit, StartError>>,
{
    let mut backoff = Backoff::default();
    while !core.is_shutting_down() && !retire.is_cancelled() {
        let started = Instant::now();
        let reason = incarnation().await.unwrap_or_else(|e| {
            tracing::error!(child, error = %e, "child failed to start");
            Exit::StartFailed
        });
        if core.is_shutting_down() {
            break;
        }
        core.metrics
            .worker_restarts
            .with_label_values(&[pool, reason.as_str()])
            .inc();
        if reason == Exit::Retired || retire.is_cancelled() {
            break;
        }
        let delay = backoff.after(started.elapsed());
        tracing::warn!(child, reason = reason.as_str(), ?delay, "restarting child");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = core.shutting_down() => break,
            _ = retire.cancelled() => break,
        }
    }
}

/// Kills the child (if still running) and reaps it.
pub async fn reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = child.start_kill();
    child.wait().await.ok()
}

/// Backoff between restarts of one child: 100 ms doubling to 5 s, reset after
/// a child stayed up for 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// The delay before the next start, given how long the last one lived.
    pub fn after(&mut self, lived: Duration) -> Duration {
        if lived >= Duration::from_secs(10) {
            self.next = Self::FIRST;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::default();
        let short = Duration::from_millis(5);
        let got: Vec<_> = (0..8).map(|_| b.after(short).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.after(Duration::from_secs(11)).as_millis(), 100);
    }
}
