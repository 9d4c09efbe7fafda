//! The admin API, on its own listener (`[admin] listen`, default
//! 127.0.0.1:8081), never on the public one. It takes only the admin key
//! (`Authorization: Bearer <key>`; its SHA-256 in `[admin] key_hash`, or
//! the key in `MMGATE_ADMIN_KEY`), compared in constant time; tenant keys
//! are never accepted. Without an admin key, reads are open and every
//! change is refused.
//!
//! - `GET /admin/pools`: the preprocess pool and the executor.
//! - `PUT /admin/pools/preprocess` `{"workers": n, "threads": t}`.
//! - `PUT /admin/models/{m}` `{"instances", "max_batch", "max_queue_delay_us"}`.
//! - `POST /admin/models/{m}/load`, `POST /admin/models/{m}/unload`.
//! - `POST /admin/reload`: re-read the config files ([`crate::reload`]).
//! - `POST /admin/models/{m}/score`: the dashboard's playground, the
//!   public scoring API under the `admin` tenant label.
//! - `GET /metrics`.
//! - `GET /ui`: the dashboard (no key needed for the page; its calls send
//!   the key the operator types in).
//!
//! Every change is validated, applied whole or not at all, logged with the
//! client's address, and answered with the new state.

use std::net::SocketAddr;

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::Method;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::error::{ApiError, Code};
use crate::executor::ModelChange;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/admin/pools", get(pools))
        .route("/admin/pools/preprocess", put(resize_preprocess))
        .route("/admin/models/{model}", put(change_model))
        .route("/admin/models/{model}/load", post(load_model))
        .route("/admin/models/{model}/unload", post(unload_model))
        .route("/admin/reload", post(reload))
        .route(
            "/admin/models/{model}/score",
            post(crate::api::score).layer(DefaultBodyLimit::max(crate::api::body_limit(
                &state.core.cfg,
            ))),
        )
        .route("/metrics", get(crate::api::metrics))
        .fallback(|| async { ApiError::new(Code::NotFound, "no such admin route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Code::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ))
        .merge(dashboard())
        .with_state(state)
}

/// Marks a request let in with the admin key (the playground's scoring).
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// The dashboard's files, served from the binary.
fn dashboard() -> Router<AppState> {
    fn file(body: &'static [u8], kind: &'static str) -> axum::routing::MethodRouter<AppState> {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
        })
    }
    const HTML: &str = "text/html; charset=utf-8";
    const JS: &str = "text/javascript; charset=utf-8";
    const CSS: &str = "text/css; charset=utf-8";
    const TEXT: &str = "text/plain; charset=utf-8";
    Router::new()
        .route("/ui", file(include_bytes!("../ui/index.html"), HTML))
        .route("/ui/", file(include_bytes!("../ui/index.html"), HTML))
        .route("/ui/app.js", file(include_bytes!("../ui/app.js"), JS))
        .route(
            "/ui/style.css",
            file(include_bytes!("../ui/style.css"), CSS),
        )
        .route(
            "/ui/vendor/uPlot.iife.min.js",
            file(
                include_bytes!(concat!(env!("MMGATE_UPLOT_DIR"), "/dist/uPlot.iife.min.js")),
                JS,
            ),
        )
        .route(
            "/ui/vendor/uPlot.min.css",
            file(
                include_bytes!(concat!(env!("MMGATE_UPLOT_DIR"), "/dist/uPlot.min.css")),
                CSS,
            ),
        )
        .route(
            "/ui/vendor/LICENSE",
            file(
                include_bytes!(concat!(env!("MMGATE_UPLOT_DIR"), "/LICENSE")),
                TEXT,
            ),
        )
}

/// Lets a request through only with the admin key (any request once a key
/// is set; without one, reads only).
async fn require_admin(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let stored = app
        .core
        .cfg
        .admin
        .key_hash
        .as_deref()
        .and_then(config::parse_key_hash);
    match stored {
        Some(stored) => {
            let given = crate::auth::bearer(req.headers()).map(config::key_digest);
            if !given.is_some_and(|h| crate::auth::same_digest(&stored, &h)) {
                return ApiError::new(
                    Code::AdminKeyRequired,
                    "the admin API takes the admin key as `Authorization: Bearer <key>`",
                )
                .into_response();
            }
            req.extensions_mut().insert(Operator);
        }
        None if req.method() != Method::GET => {
            return ApiError::new(
                Code::AdminDisabled,
                "no admin key is configured ([admin] key_hash or MMGATE_ADMIN_KEY): changes are refused",
            )
            .into_response();
        }
        None => {}
    }
    next.run(req).await
}

fn state(app: &AppState) -> serde_json::Value {
    json!({
        "preprocess": app.workers.view(),
        "executor": app.executor.view(&app.core),
    })
}

async fn pools(State(app): State<AppState>) -> Json<serde_json::Value> {
    Json(state(&app))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolChange {
    workers: Option<u32>,
    threads: Option<u32>,
}

fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| {
        ApiError::new(
            Code::BadRequest,
            format!("bad JSON body: {}", e.body_text()),
        )
    })
}

async fn resize_preprocess(
    State(app): State<AppState>,
    ConnectInfo(by): ConnectInfo<SocketAddr>,
    change: Result<Json<PoolChange>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let change = body(change)?;
    if change.workers.is_none() && change.threads.is_none() {
        return Err(ApiError::new(
            Code::BadRequest,
            "give `workers`, `threads` or both",
        ));
    }
    app.workers
        .resize(change.workers, change.threads)
        .map_err(|e| ApiError::new(Code::BadRequest, e))?;
    tracing::info!(%by, workers = ?change.workers, threads = ?change.threads,
        "admin: preprocess pool resized");
    Ok(Json(state(&app)))
}

async fn change_model(
    State(app): State<AppState>,
    ConnectInfo(by): ConnectInfo<SocketAddr>,
    model: Result<Path<String>, PathRejection>,
    change: Result<Json<ModelChange>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = crate::api::model_name(model)?;
    let change = body(change)?;
    if change.instances.is_none()
        && change.max_batch.is_none()
        && change.max_queue_delay_us.is_none()
    {
        return Err(ApiError::new(
            Code::BadRequest,
            "give `instances`, `max_batch` or `max_queue_delay_us`",
        ));
    }
    let spec = app
        .executor
        .change_model(&app.core, &model, &change)
        .await
        .inspect_err(|e| {
            tracing::warn!(%by, model, ?change, error = %e.message, "admin: model change refused")
        })?;
    tracing::info!(%by, model, instances = spec.instances.count,
        max_batch = spec.batching.max_batch,
        max_queue_delay_us = spec.batching.max_queue_delay_us,
        "admin: model changed live");
    Ok(Json(state(&app)))
}

async fn load_model(
    app: State<AppState>,
    by: ConnectInfo<SocketAddr>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_loaded(app, by, model, true).await
}

async fn unload_model(
    app: State<AppState>,
    by: ConnectInfo<SocketAddr>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_loaded(app, by, model, false).await
}

/// Loads or unloads a model: a new executor starts with the new set and
/// takes over once ready, as for any live change.
async fn set_loaded(
    State(app): State<AppState>,
    ConnectInfo(by): ConnectInfo<SocketAddr>,
    model: Result<Path<String>, PathRejection>,
    load: bool,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = crate::api::model_name(model)?;
    let what = if load { "load" } else { "unload" };
    app.executor
        .set_loaded(&app.core, &model, load)
        .await
        .inspect_err(|e| tracing::warn!(%by, model, what, error = %e.message, "admin: refused"))?;
    tracing::info!(%by, model, what, "admin: model {what}ed");
    Ok(Json(state(&app)))
}

async fn reload(
    State(app): State<AppState>,
    ConnectInfo(by): ConnectInfo<SocketAddr>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let done = crate::reload::reload(&app)
        .await
        .inspect_err(|e| tracing::warn!(%by, error = %e.message, "admin: reload refused"))?;
    tracing::info!(%by, applied = ?done.applied, restart_required = ?done.restart_required,
        "admin: config reloaded");
    let mut answer = state(&app);
    answer["applied"] = json!(done.applied);
    answer["restart_required"] = json!(done.restart_required);
    Ok(Json(answer))
}
