//! Re-reading the config files while serving (`POST /admin/reload`, or
//! SIGHUP): what can change live is applied, whole or not at all; what
//! needs a restart is named in the answer and the log.
//!
//! Applied live: `[[tenants]]`, `[workers] count` and `threads`, and each
//! model's `instances` and `[batching]`. Only values that changed in the
//! files since they were last read are applied, so a reload does not undo
//! a change made through the admin API or by the autoscaler.

use serde::Serialize;

use crate::AppState;
use crate::error::{ApiError, Code};

/// Reads the config files again (with the command line's overrides).
pub type ReadConfig = dyn Fn() -> anyhow::Result<config::ServerConfig> + Send + Sync;

/// Where the config comes from, and what it said when last read.
pub struct ConfigSource {
    read: Option<Box<ReadConfig>>,
    last: tokio::sync::Mutex<config::ServerConfig>,
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSource")
            .field("reloadable", &self.read.is_some())
            .finish_non_exhaustive()
    }
}

impl ConfigSource {
    /// `first` is the config as read at start; `read` reads it again
    /// (`None`: not reloadable, as for an embedded config in tests).
    pub fn new(first: config::ServerConfig, read: Option<Box<ReadConfig>>) -> Self {
        Self {
            read,
            last: tokio::sync::Mutex::new(first),
        }
    }
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    /// What was put in force, e.g. `tenants`, `workers.count`,
    /// `models.open_nsfw`.
    pub applied: Vec<String>,
    /// Sections that changed but take effect only at restart.
    pub restart_required: Vec<String>,
}

/// Reads the config again and applies what changed. A file that does not
/// load or validate, or a change that cannot be made, changes nothing.
pub async fn reload(app: &AppState) -> Result<Reloaded, ApiError> {
    let source = &app.config;
    let Some(read) = &source.read else {
        return Err(ApiError::new(
            Code::ConfigInvalid,
            "this gateway was not started from config files; nothing to reload",
        ));
    };
    // One reload at a time.
    let mut last = source.last.lock().await;
    let next = read().map_err(|e| {
        ApiError::new(
            Code::ConfigInvalid,
            format!("the config was not reloaded, nothing changed: {e:#}"),
        )
    })?;
    let mut applied = Vec::new();
    let restart_required = needs_restart(&last, &next);
    // Tenants first, whatever happens to the rest: a revoked key must not
    // wait for a pool change.
    let tenants = app.auth.reload(&next);
    if last.tenants != next.tenants {
        applied.push("tenants".to_string());
        last.tenants = next.tenants.clone();
    }
    let refused = |applied: &[String], e: String| {
        let done = if applied.is_empty() {
            "nothing changed".to_string()
        } else {
            format!("{} put in force, the rest not", applied.join(", "))
        };
        ApiError::new(
            Code::ConfigInvalid,
            format!("the config was not reloaded ({done}): {e}"),
        )
    };
    // Checked before the executor changes.
    let (w0, w1) = (&last.workers, &next.workers);
    let workers = (w1.count != w0.count).then_some(w1.count);
    let threads = (w1.threads != w0.threads).then_some(w1.threads);
    app.workers
        .check_resize(workers, threads)
        .map_err(|e| refused(&applied, e))?;
    // Each model's instances and batching as the files had them before and
    // have them now: only fields that changed there change live.
    let changes: Vec<_> = next
        .models
        .iter()
        .filter_map(|m| {
            let o = last.models.iter().find(|o| o.name == m.name)?;
            (o.instances != m.instances || o.batching != m.batching).then(|| (o.clone(), m.clone()))
        })
        .collect();
    if !changes.is_empty() {
        let changed = app
            .executor
            .apply_file_changes(&app.core, &changes)
            .await
            .map_err(|e| refused(&applied, e.message))?;
        applied.extend(changed.into_iter().map(|m| format!("models.{m}")));
    }
    if workers.is_some() || threads.is_some() {
        app.workers
            .resize(workers, threads)
            .map_err(|e| refused(&applied, e))?;
        applied.extend(workers.map(|_| "workers.count".to_string()));
        applied.extend(threads.map(|_| "workers.threads".to_string()));
    }
    tracing::info!(tenants, ?applied, ?restart_required, "config reloaded");
    *last = next;
    Ok(Reloaded {
        applied,
        restart_required,
    })
}

/// The parts of the config that changed but cannot change live.
fn needs_restart(old: &config::ServerConfig, new: &config::ServerConfig) -> Vec<String> {
    fn json(v: impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap_or_default()
    }
    let mut out = Vec::new();
    let sections = [
        ("server", json(&old.server), json(&new.server)),
        ("http", json(&old.http), json(&new.http)),
        ("limits", json(&old.limits), json(&new.limits)),
        ("executor", json(&old.executor), json(&new.executor)),
        ("video", json(&old.video), json(&new.video)),
        ("scheduling", json(&old.scheduling), json(&new.scheduling)),
        ("admin", json(&old.admin), json(&new.admin)),
        ("grpc", json(&old.grpc), json(&new.grpc)),
    ];
    for (name, a, b) in sections {
        if a != b {
            out.push(name.to_string());
        }
    }
    let live_workers = |w: &config::WorkerPool| {
        let mut w = w.clone();
        (w.count, w.threads) = (0, 0);
        json(w)
    };
    if live_workers(&old.workers) != live_workers(&new.workers) {
        out.push("workers".into());
    }
    let live_model = |m: &config::ModelSpec| {
        let mut m = m.clone();
        m.instances = Default::default();
        m.batching = Default::default();
        json(m)
    };
    let names =
        |c: &config::ServerConfig| c.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    if names(old) != names(new) {
        out.push("models".into());
    } else {
        for (a, b) in old.models.iter().zip(&new.models) {
            if live_model(a) != live_model(b) {
                out.push(format!("models.{}", a.name));
            }
        }
    }
    out
}

/// On each SIGHUP, reloads as `POST /admin/reload` does; a refused reload
/// is logged and changes nothing.
pub async fn on_sighup(app: AppState) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: the config cannot be reloaded by signal");
        return;
    };
    while hup.recv().await.is_some() {
        if let Err(e) = reload(&app).await {
            tracing::error!(
                code = e.code.as_str(),
                "config reload refused: {}",
                e.message
            );
        }
    }
}
