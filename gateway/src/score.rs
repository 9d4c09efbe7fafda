//! `POST /v1/models/{model}/score`: read the upload (one raw image or a
//! multipart form of several), refuse what cannot be served before any work,
//! run each image through worker → shared memory → executor, and answer with
//! scores and a timing breakdown.

use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use shm::{JobDone, RequestContext, Scores, SlotLease};
use tokio::sync::oneshot;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Code};
use crate::metrics::{DropReason, DropStage};
use crate::workers::{Task, WorkJob};

/// One uploaded image.
#[derive(Debug)]
pub struct Upload {
    pub name: Option<String>,
    pub data: Bytes,
}

#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    pub request_id: String,
    pub model: String,
    pub results: Vec<ImageResult>,
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct ImageResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub format: String,
    pub width: u32,
    pub height: u32,
    pub scores: Map<String, Value>,
    pub timings: Timings,
}

/// Milliseconds per stage. For several images, each stage is the slowest.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub decode_ms: f64,
    pub batch_wait_ms: f64,
    pub inference_ms: f64,
    pub total_ms: f64,
}

impl Timings {
    fn max(self, o: Timings) -> Timings {
        Timings {
            queue_ms: self.queue_ms.max(o.queue_ms),
            decode_ms: self.decode_ms.max(o.decode_ms),
            batch_wait_ms: self.batch_wait_ms.max(o.batch_wait_ms),
            inference_ms: self.inference_ms.max(o.inference_ms),
            total_ms: self.total_ms.max(o.total_ms),
        }
    }

    /// The `Server-Timing` header value.
    pub fn header(&self) -> String {
        format!(
            "queue;dur={:.3}, decode;dur={:.3}, batch_wait;dur={:.3}, inference;dur={:.3}, total;dur={:.3}",
            self.queue_ms, self.decode_ms, self.batch_wait_ms, self.inference_ms, self.total_ms
        )
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Reads the images of a request: a raw body, or every file of a multipart form.
/// A raw body may be a video, so it is read up to the larger of the image
/// and video limits; `check_media` applies the right one once the kind is known.
pub async fn read_uploads(
    req: Request,
    cfg: &config::ServerConfig,
    tenant_max_body_bytes: usize,
) -> Result<Vec<Upload>, ApiError> {
    let limits = &cfg.limits;
    // The tenant's `max_body_bytes` lowers the server's limits.
    let capped = |limit: usize| match tenant_max_body_bytes {
        0 => limit,
        t => limit.min(t),
    };
    let raw_limit = capped(limits.max_body_bytes.max(cfg.video.max_body_bytes));
    let form_limit = capped(limits.max_body_bytes);
    let too_large = || {
        let field = if form_limit < limits.max_body_bytes {
            "the tenant's max_body_bytes"
        } else {
            "limits.max_body_bytes"
        };
        ApiError::new(
            Code::PayloadTooLarge,
            format!("request body exceeds {field} = {form_limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let tenant_capped = raw_limit < limits.max_body_bytes.max(cfg.video.max_body_bytes);
    if declared.is_some_and(|n| n > raw_limit as u64) {
        return Err(too_large_raw(raw_limit, tenant_capped));
    }
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    if !multipart {
        let data = axum::body::to_bytes(req.into_body(), raw_limit)
            .await
            .map_err(|e| body_error(e, raw_limit, tenant_capped))?;
        return Ok(vec![Upload { name: None, data }]);
    }
    // A form holds images only: the image limit applies to the whole body.
    if declared.is_some_and(|n| n > form_limit as u64) {
        return Err(too_large());
    }
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(Code::BadRequest, format!("bad multipart body: {e}")))?;
    let mut uploads = Vec::new();
    let mut total = 0;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, &too_large)),
        };
        if uploads.len() == limits.max_images_per_request {
            return Err(ApiError::new(
                Code::TooManyImages,
                format!(
                    "more than limits.max_images_per_request = {} images in one request",
                    limits.max_images_per_request
                ),
            ));
        }
        // Echoed in the answer: cut to error::ECHO_MAX_CHARS.
        let name = field
            .file_name()
            .or(field.name())
            .map(|n| crate::error::clip(n).into_owned());
        let data = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e, &too_large))?;
        total += data.len();
        if total > form_limit {
            return Err(too_large());
        }
        uploads.push(Upload { name, data });
    }
    if uploads.is_empty() {
        return Err(ApiError::new(
            Code::NoImages,
            "the multipart form has no files",
        ));
    }
    Ok(uploads)
}

/// Reads a body that holds no video (a KServe v2 request) up to
/// `limits.max_body_bytes`, lowered by the tenant's `max_body_bytes`.
pub async fn read_body(
    req: Request,
    cfg: &config::ServerConfig,
    tenant_max_body_bytes: usize,
) -> Result<Bytes, ApiError> {
    let server = cfg.limits.max_body_bytes;
    let limit = match tenant_max_body_bytes {
        0 => server,
        t => server.min(t),
    };
    read_within(req, limit, limit < server).await
}

/// The body of `req`, at most `limit` bytes (413 past it, before reading
/// when its `Content-Length` says so); `tenant_capped` when the limit is
/// the tenant's.
pub async fn read_within(
    req: Request,
    limit: usize,
    tenant_capped: bool,
) -> Result<Bytes, ApiError> {
    let capped = tenant_capped;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large_raw(limit, capped));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| body_error(e, limit, capped))
}

fn body_error(e: axum::Error, limit: usize, tenant_capped: bool) -> ApiError {
    let inner = e.into_inner();
    if let Some(b) = crate::body::BodyError::find(inner.as_ref()) {
        b.to_api()
    } else if inner.is::<http_body_util::LengthLimitError>() {
        too_large_raw(limit, tenant_capped)
    } else {
        ApiError::new(
            Code::BadRequest,
            format!("could not read the request body: {inner}"),
        )
    }
}

fn too_large_raw(limit: usize, tenant_capped: bool) -> ApiError {
    let whose = if tenant_capped {
        "the tenant's max_body_bytes"
    } else {
        "the limit"
    };
    ApiError::new(
        Code::PayloadTooLarge,
        format!("request body exceeds {whose} of {limit} bytes"),
    )
}

fn multipart_error(
    e: axum::extract::multipart::MultipartError,
    too_large: &dyn Fn() -> ApiError,
) -> ApiError {
    if let Some(b) = crate::body::BodyError::find(&e) {
        b.to_api()
    } else if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::new(Code::BadRequest, format!("bad multipart body: {e}"))
    }
}

/// Refuses an upload that is empty, not a format mmgate decodes, or over its
/// kind's byte limit, before it costs a worker anything.
pub fn check_media(u: &Upload, cfg: &config::ServerConfig) -> Result<config::MediaKind, ApiError> {
    if u.data.is_empty() {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "the body is empty (0 bytes)",
        ));
    }
    let kind = config::sniff(&u.data).ok_or_else(|| {
        ApiError::new(
            Code::UnsupportedMediaType,
            "the body is not a JPEG, PNG, WebP, GIF or BMP image nor an MP4, MOV, WebM or MKV video (checked by its first bytes, not its Content-Type)",
        )
    })?;
    let (limit, field) = if kind.is_video() {
        (cfg.video.max_body_bytes, "video.max_body_bytes")
    } else {
        (cfg.limits.max_body_bytes, "limits.max_body_bytes")
    };
    if u.data.len() > limit {
        return Err(ApiError::new(
            Code::PayloadTooLarge,
            format!(
                "the {} is {} bytes; {field} is {limit}",
                kind.name(),
                u.data.len()
            ),
        ));
    }
    Ok(kind)
}

/// Runs one image through the pipeline.
pub async fn score_one(
    app: &AppState,
    ctx: &RequestContext,
    model: u16,
    index: usize,
    upload: Upload,
) -> Result<ImageResult, ApiError> {
    let started = Instant::now();
    let core = &app.core;
    let (reply, rx) = oneshot::channel();
    let job = WorkJob::new(core, ctx, model, upload.data, Task::Image(reply));
    let (claim, enqueued) = (job.claim(), job.upload.enqueued);
    app.workers.submit(job)?;
    app.executor.expect(core, model, ctx);
    let _abandon = claim.abandon_on_drop();
    // Bounded by the queue wait plus the decode deadline (a worker over it
    // is killed anyway); a job still queued at the queue deadline is
    // abandoned.
    let within = (Duration::from_millis(core.cfg.server.queue_timeout_ms)
        + crate::workers::hung_after(core.cfg.limits.decode_deadline_ms))
    .saturating_sub(enqueued.elapsed());
    let answer = tokio::time::timeout(within, rx);
    tokio::pin!(answer);
    let answered = tokio::select! {
        biased;
        r = &mut answer => r,
        () = tokio::time::sleep_until(crate::workers::queue_deadline(core, enqueued)) => {
            crate::workers::give_up_if_queued(core, &claim)?;
            answer.await
        }
    };
    let pre = match answered {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) if ctx.expired() => return Err(deadline_exceeded()),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                Code::WorkerCrashed,
                "the preprocess worker died while decoding this image; it has been restarted, retry the request",
            ));
        }
        Err(_) => {
            return Err(ApiError::new(
                Code::QueueTimeout,
                format!(
                    "no preprocess worker took this image within {} ms",
                    within.as_millis()
                ),
            ));
        }
    };
    let decode = Duration::from_micros(pre.done.decode_us);
    let scores = infer_sample(app, ctx, model, pre.lease).await?;
    let timings = Timings {
        queue_ms: ms(pre.queue),
        decode_ms: ms(decode),
        batch_wait_ms: scores.queue_us as f64 / 1e3,
        inference_ms: scores.infer_us as f64 / 1e3,
        total_ms: ms(started.elapsed()),
    };
    observe_preprocess(core, pre.queue, decode);
    let labels = &core.cfg.models[model as usize].output.labels;
    Ok(result(
        index,
        upload.name,
        &pre.done,
        &scores,
        labels,
        timings,
    ))
}

/// A sample in shared memory through the model: the one path of every
/// image and every video frame from its slot lease to its scores. Work past
/// its deadline is dropped here; the batch wait and inference stages are
/// observed per sample.
pub async fn infer_sample(
    app: &AppState,
    ctx: &RequestContext,
    model: u16,
    lease: SlotLease,
) -> Result<Scores, ApiError> {
    let core = &app.core;
    if ctx.expired() {
        core.metrics
            .drop_work(DropStage::Inference, DropReason::Deadline);
        return Err(deadline_exceeded());
    }
    let within = Duration::from_millis(core.cfg.executor.infer_timeout_ms);
    let scores = app
        .executor
        .infer(ctx, lease, core.pending(model), within)
        .await?;
    let stage = &core.metrics.stage_duration;
    stage
        .with_label_values(&["batch_wait"])
        .observe(scores.queue_us as f64 / 1e6);
    stage
        .with_label_values(&["inference"])
        .observe(scores.infer_us as f64 / 1e6);
    let spec = &core.cfg.models[model as usize];
    let max_batch = app
        .executor
        .max_batch(model)
        .unwrap_or(spec.batching.max_batch);
    let name = [spec.name.as_str()];
    core.metrics
        .batch_size
        .with_label_values(&name)
        .observe(scores.batch as f64);
    core.metrics
        .batch_fill
        .with_label_values(&name)
        .observe(f64::from(scores.batch) / f64::from(max_batch.max(1)));
    Ok(scores)
}

/// Observes a job's wait for a worker thread and a slot, and its decode
/// (an image's, or a whole video's).
pub fn observe_preprocess(core: &crate::core::Core, queue: Duration, decode: Duration) {
    let stage = &core.metrics.stage_duration;
    stage
        .with_label_values(&["queue"])
        .observe(queue.as_secs_f64());
    stage
        .with_label_values(&["decode"])
        .observe(decode.as_secs_f64());
}

/// Scores as answers show them: each label with its value.
pub fn labelled(labels: &[String], values: &[f32]) -> Map<String, Value> {
    labels
        .iter()
        .zip(values)
        .map(|(l, v)| (l.clone(), Value::from(*v as f64)))
        .collect()
}

fn result(
    index: usize,
    name: Option<String>,
    done: &JobDone,
    scores: &Scores,
    labels: &[String],
    timings: Timings,
) -> ImageResult {
    ImageResult {
        index,
        name,
        format: done.format.clone(),
        width: done.width,
        height: done.height,
        scores: labelled(labels, &scores.values),
        timings,
    }
}

/// Runs every upload concurrently; the first failure fails the request and
/// names the image.
pub async fn score_all(
    app: &AppState,
    ctx: &RequestContext,
    caller: &Caller,
    model: u16,
    uploads: Vec<Upload>,
) -> Result<(Vec<ImageResult>, Timings), ApiError> {
    let n = uploads.len();
    for (i, u) in uploads.iter().enumerate() {
        let kind =
            check_media(u, &app.core.cfg).map_err(|e| name_image(e, i, n, u.name.as_deref()))?;
        if kind.is_video() {
            let e = ApiError::new(
                Code::UnsupportedMediaType,
                "videos are scored one per request, as the raw body",
            );
            return Err(name_image(e, i, n, u.name.as_deref()));
        }
    }
    // The tenant's sample tokens, once the images are known to be images;
    // given back if the gateway refuses them for its own load.
    let samples = u32::try_from(n).unwrap_or(u32::MAX);
    caller.take_samples(samples)?;
    let names: Vec<Option<String>> = uploads.iter().map(|u| u.name.clone()).collect();
    let futs = uploads
        .into_iter()
        .enumerate()
        .map(|(i, u)| score_one(app, ctx, model, i, u));
    let mut results = Vec::with_capacity(n);
    let mut timings = Timings::default();
    let answers = futures::future::join_all(futs).await;
    if answers
        .iter()
        .all(|r| r.as_ref().is_err_and(|e| e.code.is_overload()))
    {
        caller.refund_samples(samples);
    }
    for (i, r) in answers.into_iter().enumerate() {
        let r = r.map_err(|e| name_image(e, i, n, names[i].as_deref()))?;
        timings = timings.max(r.timings);
        results.push(r);
    }
    Ok((results, timings))
}

/// The answer to a request whose deadline passed before its answer.
pub fn deadline_exceeded() -> ApiError {
    ApiError::new(
        Code::DeadlineExceeded,
        "the request's deadline (X-Request-Timeout, or the tenant's deadline_ms) passed before it was scored; its remaining work was dropped",
    )
}

fn name_image(e: ApiError, i: usize, n: usize, name: Option<&str>) -> ApiError {
    if n == 1 {
        return e;
    }
    match name {
        Some(name) => e.context(&format!("image {} of {n} ({name:?})", i + 1)),
        None => e.context(&format!("image {} of {n}", i + 1)),
    }
}
