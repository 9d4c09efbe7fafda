//! mmgate's gateway: the HTTP front end, the scheduler (queues, slots,
//! deadlines) and the supervisor of the preprocess workers and the executor.

pub mod admin;
pub mod api;
pub mod auth;
pub mod body;
pub mod children;
pub mod client_shm;
pub mod core;
pub mod degrade;
pub mod error;
pub mod executor;
pub mod grpc;
pub mod http;
pub(crate) mod link;
pub mod metrics;
pub(crate) mod parse_errors;
pub mod rate;
pub mod reload;
pub mod score;
pub mod settings;
pub mod tune;
pub mod v2;
pub mod video;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use api::app;

use crate::auth::Tenants;
use crate::core::Core;
use crate::executor::Executor;
use crate::workers::WorkerPool;

/// What every handler sees.
#[derive(Debug, Clone)]
pub struct AppState {
    pub core: Arc<Core>,
    pub workers: Arc<WorkerPool>,
    pub executor: Arc<Executor>,
    /// The tenants in force (reloaded on SIGHUP).
    pub auth: Arc<Tenants>,
    /// Uploads being received and answers not yet written
    /// (`server.max_inflight_body_bytes`).
    pub body_budget: body::Budget,
    /// The config files, to reload (`POST /admin/reload`, SIGHUP).
    pub config: Arc<reload::ConfigSource>,
    /// Clients' shared-memory regions (the KServe v2 extension).
    pub client_shm: Arc<client_shm::Regions>,
}

impl AppState {
    /// Creates the shared memory and starts supervising every child. The
    /// handles end once `core.shutdown()` was called and the children are reaped.
    pub fn start(
        cfg: config::ServerConfig,
        bin_dir: std::path::PathBuf,
        config: reload::ConfigSource,
    ) -> anyhow::Result<(Self, Vec<JoinHandle<()>>)> {
        let auth = Arc::new(Tenants::new(&cfg));
        let body_budget = body::Budget::new(cfg.server.max_inflight_body_bytes);
        let client_shm = Arc::new(client_shm::Regions::new(cfg.server.allow_client_shm));
        let core = Core::new(cfg, bin_dir)?;
        let workers = WorkerPool::new(&core);
        let executor = Arc::new(Executor::new(core.cfg.models.clone()));
        let tasks = vec![
            tokio::spawn(workers.clone().run()),
            tokio::spawn(executor.clone().supervise(core.clone())),
        ];
        let state = Self {
            core,
            workers,
            executor,
            auth,
            body_budget,
            config: Arc::new(config),
            client_shm,
        };
        Ok((state, tasks))
    }
}

/// Serves until SIGTERM or SIGINT, then stops accepting, drains in-flight
/// requests (up to `server.shutdown_grace_ms`) and stops the children.
/// `read` reads the config files again, on SIGHUP or `POST /admin/reload`
/// (see [`reload`] for what takes effect live).
pub async fn run(
    mut cfg: config::ServerConfig,
    read: impl Fn() -> anyhow::Result<config::ServerConfig> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let source = reload::ConfigSource::new(cfg.clone(), Some(Box::new(read)));
    let bin_dir = settings::bin_dir(&cfg)?;
    settings::check_cpus(&cfg)?;
    fit_connections_to_fd_limit(&mut cfg);
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.server.listen))?;
    let admin_listener = match cfg.admin.listen.as_str() {
        "" => None,
        a => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (admin): {e}"))?,
        ),
    };
    let grpc_listener = match cfg.grpc.listen.as_str() {
        "" => None,
        a => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (gRPC): {e}"))?,
        ),
    };
    let grace = Duration::from_millis(cfg.server.shutdown_grace_ms);
    let (state, supervisors) = AppState::start(cfg, bin_dir, source)?;
    let addr = listener.local_addr()?;
    // Tests and scripts read the bound address from this line (port 0 works).
    println!("mmgate listening on http://{addr}");
    tracing::info!(%addr, "listening");
    if let Some(l) = &admin_listener {
        let admin = l.local_addr()?;
        println!("mmgate admin listening on http://{admin}");
        tracing::info!(%admin, "admin API listening");
    }
    if let Some(l) = &grpc_listener {
        let grpc = l.local_addr()?;
        println!("mmgate grpc listening on {grpc}");
        tracing::info!(%grpc, "KServe v2 gRPC listening");
    }
    let core = state.core.clone();
    tokio::spawn(reload::on_sighup(state.clone()));
    let (signal_tx, signal) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = signal_tx.send(true);
    });
    if let Some(l) = admin_listener {
        let mut stop = signal.clone();
        let admin = admin::app(state.clone());
        let cap = ADMIN_MAX_CONNECTIONS as usize;
        tokio::spawn(http::serve(l, admin, core.clone(), cap, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    // Stops taking calls on the signal and finishes those in flight; the
    // children are stopped only after it.
    let grpc_server = grpc_listener.map(|l| {
        let mut stop = signal.clone();
        tokio::spawn(grpc::serve(l, state.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let executor = state.executor.clone();
    let drain_core = core.clone();
    let mut drain = signal.clone();
    let cap = core.cfg.http.max_connections;
    let server = http::serve(listener, app(state), core.clone(), cap, async move {
        let _ = drain.wait_for(|s| *s).await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        drain_core.start_draining();
    });
    let mut late = signal.clone();
    let mut refused = None;
    tokio::select! {
        () = server => {},
        _ = async move {
            let _ = late.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "shutdown grace period over; abandoning in-flight requests"),
        // A config the executor cannot serve is refused at start, like any
        // other config error, rather than retried forever behind a 503.
        m = executor.refused_at_start() => {
            tracing::error!(reason = %m, "the executor refused the config; stopping");
            refused = Some(m);
        }
    }
    if let Some(g) = grpc_server {
        if refused.is_some() {
            g.abort();
        } else {
            let _ = tokio::time::timeout(grace, g).await;
        }
    }
    core.shutdown();
    let all = futures::future::join_all(supervisors);
    if tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .is_err()
    {
        tracing::warn!("children did not stop within 10 s");
    }
    if let Some(m) = refused {
        anyhow::bail!("the executor cannot start: {m}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Open files kept for everything but client connections: the children's
/// sockets and memfds, the listener, logs, the shared-memory pools.
const RESERVED_FDS: u64 = 256;

/// Connections the admin listener serves at once (more get 503): an
/// operator's tools need a few, and idle ones must not take the fds kept
/// for children.
const ADMIN_MAX_CONNECTIONS: u64 = 16;

/// Raises the open-file limit to its hard limit and lowers
/// `http.max_connections` to what it leaves after the reserve, so a
/// connection flood cannot take the fds a restarting child needs.
fn fit_connections_to_fd_limit(cfg: &mut config::ServerConfig) {
    let nofile = http::raise_nofile_limit();
    // The pool may grow to `workers.max` (one more while one is recycled).
    let grpc = if cfg.grpc.listen.is_empty() {
        0
    } else {
        cfg.grpc.max_connections as u64
    };
    let reserve =
        RESERVED_FDS + ADMIN_MAX_CONNECTIONS + grpc + 8 * (u64::from(cfg.workers.max) + 1);
    let fit = nofile.saturating_sub(reserve).max(16) as usize;
    if cfg.http.max_connections > fit {
        tracing::warn!(
            nofile,
            reserve,
            "http.max_connections lowered from {} to {fit} to fit the open-file limit",
            cfg.http.max_connections
        );
        cfg.http.max_connections = fit;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
