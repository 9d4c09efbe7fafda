//! Routes and handlers. `app(state)` is a pure builder so tests can drive it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::Instrument;

use crate::AppState;
use crate::body::{Metered, Reservation};
use crate::error::{ApiError, Code};
use crate::score::{self, ScoreResponse};
use crate::video::{self, VideoResponse};
use shm::RequestContext;

/// A scoring answer: images or one video (`/v1`), or a v2 `infer`.
#[derive(Debug)]
pub enum Scored {
    Images(ScoreResponse),
    Video(Box<VideoResponse>),
    V2(Box<crate::v2::InferResponse>),
}

/// The protocol a scoring request came in by: the request path is the
/// same, its body and answers are the protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// mmgate's own `/v1` API.
    V1,
    /// The KServe v2 / Open Inference Protocol (`/v2/models/{m}/infer`).
    V2,
}

pub fn app(state: AppState) -> Router {
    let body_limit = body_limit(&state.core.cfg);
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route(
            "/v1/models/{model}/score",
            post(score).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::v2::routes())
        .fallback(|| async { ApiError::new(Code::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Code::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .with_state(state)
}

/// The largest body a scoring route takes: an image request's or a video's.
pub(crate) fn body_limit(cfg: &config::ServerConfig) -> usize {
    cfg.limits.max_body_bytes.max(cfg.video.max_body_bytes)
}

/// A model as `/v1/models` shows it: its spec, and under `runtime` what
/// actually runs it (backend, precision, device, fallbacks, the precision
/// check), or `null` while no executor has loaded it.
/// `m` is the spec executors run now (instances and batching as changed
/// live by the admin API).
fn model_json(app: &AppState, m: &config::ModelSpec) -> serde_json::Value {
    json!({
        "name": m.name,
        "backend": m.backend,
        "runtime": app.executor.runtime(&m.name),
        "input": m.input,
        "preprocess": m.preprocess,
        "labels": m.output.labels,
        "postprocess": m.output.postprocess,
        "batching": m.batching,
        "instances": m.instances,
    })
}

async fn list_models(State(app): State<AppState>) -> Json<serde_json::Value> {
    let models: Vec<_> = app
        .executor
        .models()
        .iter()
        .map(|m| model_json(&app, m))
        .collect();
    Json(json!({ "models": models }))
}

async fn get_model(
    State(app): State<AppState>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = model_name(model)?;
    let (i, _) = app
        .core
        .model(&model)
        .ok_or_else(|| unknown_model(&model))?;
    let live = app.executor.models();
    Ok(Json(model_json(&app, &live[i as usize])))
}

pub(crate) fn unknown_model(name: &str) -> ApiError {
    ApiError::new(
        Code::ModelNotFound,
        format!(
            "model {:?} does not exist; GET /v1/models lists the models",
            crate::error::clip(name)
        ),
    )
}

/// 503 while fewer than `[workers] min` workers are ready, the executor is
/// not, or the gateway drains; `degraded` while below the desired size.
/// Each model's state for readiness: `loaded`, `unloaded` (by the admin
/// API) or `not_loaded`, with what runs it.
fn model_states(app: &AppState) -> Vec<(String, &'static str, Option<shm::ModelRuntime>)> {
    app.executor
        .models()
        .into_iter()
        .map(|m| {
            let r = app.executor.runtime(&m.name);
            let state = match (&r, app.executor.is_unloaded(&m.name)) {
                (_, true) => "unloaded",
                (Some(_), false) => "loaded",
                (None, false) => "not_loaded",
            };
            (m.name, state, r)
        })
        .collect()
}

/// Why the gateway is not ready, as stable codes; empty when it is.
pub(crate) fn not_ready(app: &AppState) -> Vec<&'static str> {
    let mut why = Vec::new();
    if app.workers.ready_count() < app.core.cfg.workers.min as usize {
        why.push("workers_below_min");
    }
    let heartbeat = Duration::from_millis(app.core.cfg.executor.heartbeat_ms);
    match app.executor.silent_for() {
        None => why.push("executor_not_ready"),
        // One heartbeat missed: two intervals of silence.
        Some(s) if s > 2 * heartbeat => why.push("executor_missed_heartbeat"),
        Some(_) => {
            if model_states(app).iter().any(|(_, s, _)| *s == "not_loaded") {
                why.push("model_not_loaded");
            }
        }
    }
    if app.core.is_draining() {
        why.push("draining");
    }
    why
}

/// Ready when at least `workers.min` workers are ready, the executor
/// serves and has been heard from within one heartbeat, every model not
/// unloaded by the admin API is loaded, and the gateway is not draining.
/// `not_ready` lists why not (stable codes); `degraded` says the pool runs
/// below `desired`.
async fn readyz(State(app): State<AppState>) -> Response {
    let workers = app.workers.ready_count();
    let desired = app.workers.desired() as usize;
    let silent = app.executor.silent_for();
    let not_ready = not_ready(&app);
    let models: Vec<_> = model_states(&app)
        .into_iter()
        .map(|(name, state, r)| {
            json!({
                "name": name,
                "state": state,
                "backend": r.as_ref().map(|r| r.backend.as_str()),
                "precision": r.as_ref().map(|r| r.precision.as_str()),
                "device": r.as_ref().map(|r| r.device.as_str()),
                "gpu": r.as_ref().and_then(|r| r.gpu.as_ref()),
                "fallbacks": r.as_ref().map(|r| &r.fallbacks),
            })
        })
        .collect();
    let ready = not_ready.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "not_ready": not_ready,
        "degraded": workers < desired,
        "workers_ready": workers,
        "workers": desired,
        "workers_min": app.core.cfg.workers.min,
        "executor_ready": silent.is_some(),
        "executor_silent_ms": silent.map(|s| s.as_millis() as u64),
        "draining": app.core.is_draining(),
        "models": models,
    });
    (status, Json(body)).into_response()
}

pub(crate) async fn metrics(State(app): State<AppState>) -> Response {
    app.core.refresh_gauges();
    let m = &app.core.metrics;
    m.queue_depth
        .with_label_values(&["preprocess"])
        .set(app.workers.queued() as i64);
    m.buffered_bytes.set(app.body_budget.held_bytes() as i64);
    m.observe_processes(&[
        ("gateway", vec![std::process::id()]),
        ("preprocess", app.workers.pids()),
        ("executor", app.executor.pids()),
    ]);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}

fn request_id(headers: &HeaderMap) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{:x}-{:x}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            )
        })
}

/// The `{model}` path segment, or a JSON 400 when it is not valid UTF-8.
pub(crate) fn model_name(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(m)| m)
        .map_err(|e| ApiError::new(Code::BadRequest, format!("bad model name in the path: {e}")))
}

pub(crate) async fn score(
    State(app): State<AppState>,
    model: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    match model_name(model) {
        Ok(m) => serve_scoring(app, m, req, Front::V1).await,
        Err(e) => e.into_response(),
    }
}

/// One scoring request, whatever its protocol: admission, budgets,
/// deadline, the work, metrics and the request id.
pub(crate) async fn serve_scoring(
    app: AppState,
    model: String,
    mut req: Request,
    front: Front,
) -> Response {
    let started = Instant::now();
    let rid = request_id(req.headers());
    let mut body_read = false;
    // The upload reserves its bytes of the shared budget as they arrive;
    // the answer's bytes take their place until the answer is written. A
    // gRPC call brings the reservation its message made as it arrived.
    let reservation = req
        .extensions_mut()
        .remove::<Arc<Reservation>>()
        .unwrap_or_else(|| app.body_budget.reserve());
    // Every log line of this request, here and in the children, carries
    // its id.
    let span = tracing::debug_span!("request", request_id = %rid);
    let (tenant, served, outcome) =
        score_inner(&app, &model, &rid, req, &reservation, &mut body_read, front)
            .instrument(span.clone())
            .await;
    let core = &app.core;
    // Labelled with the model that served (a route's pick).
    let known = core.model(&served).is_some();
    let label = if known { served.as_str() } else { "unknown" };
    let mut resp = match outcome {
        Ok(body) => {
            let (mut r, timings) = match body {
                Scored::Images(b) => {
                    let t = b.timings;
                    ((StatusCode::OK, Json(b)).into_response(), t)
                }
                Scored::Video(b) => {
                    let t = b.timings;
                    ((StatusCode::OK, Json(b)).into_response(), t)
                }
                Scored::V2(b) => {
                    let t = b.timings;
                    (b.into_response(), t)
                }
            };
            if let Ok(v) = HeaderValue::from_str(&timings.header()) {
                r.headers_mut().insert("server-timing", v);
            }
            r
        }
        Err(e) if front == Front::V2 => {
            tracing::debug!(request_id = rid, error = %e, "request failed");
            let mut r = crate::v2::error_response(e);
            if !body_read {
                // Refused before its body was read: the close lingers.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
        Err(e) => {
            tracing::debug!(request_id = rid, error = %e, "request failed");
            if body_read {
                e.into_response()
            } else {
                e.into_closing_response()
            }
        }
    };
    let code = resp.status().as_u16().to_string();
    core.metrics
        .requests
        .with_label_values(&[label, tenant.as_str(), code.as_str()])
        .inc();
    if known {
        core.metrics
            .request_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| tracing::debug!(status = resp.status().as_u16(), tenant, "answered"));
    let size = http_body::Body::size_hint(resp.body());
    reservation.settle(size.exact().unwrap_or(size.lower()) as usize);
    // Held with the answer until it is written (http.rs).
    resp.extensions_mut().insert(reservation);
    resp
}

/// Returns the tenant label for metrics, the model that served (the one
/// called, or its route's pick), and the outcome.
async fn score_inner(
    app: &AppState,
    model: &str,
    rid: &str,
    req: Request,
    reservation: &Arc<Reservation>,
    body_read: &mut bool,
    front: Front,
) -> (String, String, Result<Scored, ApiError>) {
    // The admin listener's playground: let in by the admin key.
    let admitted = if req.extensions().get::<crate::admin::Operator>().is_some() {
        Ok(crate::auth::Caller::unlimited("admin", model))
    } else {
        app.auth.current().admit(req.headers(), model)
    };
    let caller = match admitted {
        Ok(c) => c,
        Err((tenant, e)) => return (tenant, model.to_string(), Err(e)),
    };
    let tenant = caller.tenant.clone();
    let served = caller.served.clone();
    if let Some(share) = &caller.budget
        && let Err(e) = reservation.charge_tenant(share.clone())
    {
        return (tenant, served, Err(e.to_api()));
    }
    // Degradation before rejection: batch work is shed first.
    let sched = &app.core.cfg.scheduling;
    let delay = app.workers.queue_delay(&crate::degrade::WATCHED);
    if let Err(e) = crate::degrade::shed(sched, caller.class, delay) {
        app.core.metrics.degrade(caller.class, "shed");
        return (tenant, served, Err(e));
    }
    let deadline = match deadline_of(req.headers(), caller.deadline_ms) {
        Ok(d) => d,
        Err(e) => return (tenant, served, Err(e)),
    };
    let model = served.as_str();
    // One context for the request, carried in every job message.
    let ctx = RequestContext {
        request_id: rid.to_string(),
        tenant: tenant.clone(),
        class: caller.class,
        weight: caller.weight,
        cost: 1,
        deadline_ns: deadline.map_or(0, |d| {
            shm::monotonic_ns().saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }),
    };
    let ctx = &ctx;
    let work = async {
        if app.core.is_draining() {
            return Err(ApiError::new(
                Code::ShuttingDown,
                "the gateway is shutting down",
            ));
        }
        let (idx, _) = app.core.model(model).ok_or_else(|| unknown_model(model))?;
        if app.executor.is_unloaded(model) {
            return Err(ApiError::new(
                Code::ModelNotLoaded,
                format!("model {model:?} is unloaded; POST /admin/models/{model}/load loads it"),
            ));
        }
        // The upload times out when idle.
        let http = &app.core.cfg.http;
        let req =
            req.map(|b| axum::body::Body::new(Metered::with_limits(b, reservation.clone(), http)));
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(serde_urlencoded::from_str)
            .transpose()
            .map_err(|e| ApiError::new(Code::BadRequest, format!("bad query string: {e}")))?
            .unwrap_or_default();
        if front == Front::V2 {
            let header_len = crate::v2::header_len(req.headers())?;
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0);
            let body = score::read_body(req, &app.core.cfg, caller.max_body_bytes).await?;
            *body_read = true;
            return crate::v2::run(app, ctx, &caller, idx, body, header_len, peer)
                .await
                .map(|r| Scored::V2(Box::new(r)));
        }
        let mut uploads = score::read_uploads(req, &app.core.cfg, caller.max_body_bytes).await?;
        *body_read = true;
        if uploads.len() == 1 && config::sniff(&uploads[0].data).is_some_and(|k| k.is_video()) {
            let upload = uploads.pop().expect("one upload");
            score::check_media(&upload, &app.core.cfg)?;
            let v = &app.core.cfg.video;
            let (mut sampling, threshold) =
                video::sampling_from_query(&query, v, caller.max_video_frames)?;
            let delay = app.workers.queue_delay(&crate::degrade::WATCHED);
            let degraded = crate::degrade::video(sched, caller.class, delay, &mut sampling);
            if let Some(d) = &degraded {
                app.core.metrics.degrade(caller.class, d.sampling.action());
            }
            // Its frames are known once sampled: one token to start, the
            // others charged as they come.
            caller.take_samples(1)?;
            let r = video::score_video(app, ctx, &caller, idx, upload.data, sampling, threshold)
                .await
                .inspect_err(|e| {
                    if e.code.is_overload() {
                        caller.refund_samples(1);
                    }
                })?;
            return Ok(Scored::Video(Box::new(video::VideoResponse {
                degraded,
                ..r
            })));
        }
        let (results, timings) = score::score_all(app, ctx, &caller, idx, uploads).await?;
        Ok(Scored::Images(ScoreResponse {
            request_id: rid.to_string(),
            model: model.to_string(),
            results,
            timings,
        }))
    };
    // At the deadline the work is dropped: what is still queued is skipped
    // by the stage that would have run it.
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, work)
            .await
            .unwrap_or_else(|_| Err(score::deadline_exceeded())),
        None => work.await,
    };
    drop(caller);
    (tenant, served, result)
}

/// Longest `X-Request-Timeout` accepted, in ms (and longest tenant
/// `deadline_ms`).
const MAX_REQUEST_TIMEOUT_MS: u64 = config::MAX_DEADLINE_MS;

/// The request's deadline, from now: `X-Request-Timeout: <ms>`, else the
/// tenant's `deadline_ms`; `None` = no deadline.
fn deadline_of(headers: &HeaderMap, tenant_ms: u64) -> Result<Option<Duration>, ApiError> {
    let ms = match headers.get("x-request-timeout") {
        None => tenant_ms,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ms| (1..=MAX_REQUEST_TIMEOUT_MS).contains(ms))
            .ok_or_else(|| {
                ApiError::new(
                    Code::BadRequest,
                    format!(
                        "X-Request-Timeout must be whole milliseconds, 1 to {MAX_REQUEST_TIMEOUT_MS}"
                    ),
                )
            })?,
    };
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}
