//! The KServe v2 / Open Inference Protocol over HTTP, beside mmgate's own
//! `/v1` API: health, server and model metadata, Triton's model
//! configuration, and `infer` with JSON tensors or the binary tensor data
//! extension.
//!
//! An `infer` takes the model's one input in either of two forms:
//! - `FP32`, shape `[N, …]` as the model's input: raw tensors, written from
//!   the body straight into shared-memory slots and sent to the executor's
//!   batcher (no preprocess worker);
//! - `BYTES`, shape `[N]`: encoded images, each through the preprocess
//!   pool like a `/v1` upload.
//!
//! It answers `scores` (`FP32 [N, labels]`) and, when asked, `labels`
//! (`BYTES [N, labels]`). Admission, tenancy, limits, deadlines and metrics
//! are the `/v1` request's ([`crate::api`]); errors are written the way the
//! protocol writes them, `{"error": "…"}`, with the code's status.

use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Code};
use crate::score::{self, Timings, Upload};
use shm::RequestContext;

/// The header giving the JSON part's length in a binary request or answer.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Longest request `id` echoed back.
const MAX_ID_BYTES: usize = 256;

/// The only model version: models are replaced, not versioned.
const VERSION: &str = "1";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .merge(shared_memory_routes(
            "systemsharedmemory",
            get(shm_status),
            post(shm_register),
            post(shm_unregister),
        ))
        .merge(shared_memory_routes(
            "cudasharedmemory",
            get(cuda_status),
            post(cuda_register),
            post(cuda_unregister),
        ))
}

/// A shared-memory extension's routes under `/v2/{kind}`: status of all
/// regions or one, register one, unregister one or all.
fn shared_memory_routes(
    kind: &str,
    status: MethodRouter<AppState>,
    register: MethodRouter<AppState>,
    unregister: MethodRouter<AppState>,
) -> Router<AppState> {
    Router::new()
        .route(&format!("/v2/{kind}/status"), status.clone())
        .route(&format!("/v2/{kind}/region/{{region}}/status"), status)
        .route(&format!("/v2/{kind}/region/{{region}}/register"), register)
        .route(
            &format!("/v2/{kind}/region/{{region}}/unregister"),
            unregister.clone(),
        )
        .route(&format!("/v2/{kind}/unregister"), unregister)
}

/// An error as the protocol writes it: `{"error": "<code>: <message>"}`.
/// Bad input data (an element that is not an image, 415/422 on `/v1`) is
/// the protocol's 400.
pub fn error_response(e: ApiError) -> Response {
    let status = match e.code.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => {
            StatusCode::BAD_REQUEST
        }
        s => s,
    };
    let message = format!("{}: {}", e.code.as_str(), e.message);
    let mut r = (status, Json(json!({ "error": message }))).into_response();
    if let Some(s) = e.retry_after.or(e.code.row().3)
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// `{model}` or `{model}/versions/{version}`: the model's index and spec,
/// or the protocol's 404.
fn model_of(
    app: &AppState,
    path: Result<Path<Vec<(String, String)>>, PathRejection>,
) -> Result<(u16, config::ModelSpec), ApiError> {
    let Path(parts) =
        path.map_err(|e| ApiError::new(Code::BadRequest, format!("bad path: {e}")))?;
    let get = |k: &str| parts.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    model(
        app,
        get("model").unwrap_or_default(),
        get("version").unwrap_or_default(),
    )
}

/// Model `name` at `version` (empty = the current one), with its index and
/// the spec as executors run it now.
pub fn model(
    app: &AppState,
    name: &str,
    version: &str,
) -> Result<(u16, config::ModelSpec), ApiError> {
    if !version.is_empty() && version != VERSION {
        return Err(ApiError::new(
            Code::ModelNotFound,
            format!(
                "model {:?} has no version {:?}; its one version is {VERSION}",
                crate::error::clip(name),
                crate::error::clip(version)
            ),
        ));
    }
    let (i, _) = app
        .core
        .model(name)
        .ok_or_else(|| crate::api::unknown_model(name))?;
    // Instances and batching change live.
    let spec = app.executor.models()[i as usize].clone();
    Ok((i, spec))
}

/// Whether `spec`'s model can serve now.
pub fn model_is_ready(app: &AppState, spec: &config::ModelSpec) -> bool {
    app.executor.is_ready()
        && !app.executor.is_unloaded(&spec.name)
        && app.executor.runtime(&spec.name).is_some()
}

/// A tensor as metadata shows it: name, datatype, shape (`-1` for the
/// batch).
pub type TensorMeta = (String, &'static str, Vec<i64>);

/// Whether the model takes raw FP32 tensors: not when its slots hold
/// uint8 pixels, which only encoded images (BYTES) can fill.
fn takes_fp32(spec: &config::ModelSpec) -> bool {
    spec.slot_dtype == config::SlotDtype::Float32
}

/// The model's input and output tensors. The input is the FP32 tensor,
/// or, for a model whose slots hold uint8 pixels, encoded images (BYTES,
/// one per batch element).
pub fn tensors(spec: &config::ModelSpec) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    let labels = spec.output.labels.len() as i64;
    let input = if takes_fp32(spec) {
        let mut shape = vec![-1];
        shape.extend(input_dims(spec));
        (spec.input.name.clone(), "FP32", shape)
    } else {
        (spec.input.name.clone(), "BYTES", vec![-1, 1])
    };
    (
        vec![input],
        vec![
            ("scores".into(), "FP32", vec![-1, labels]),
            ("labels".into(), "BYTES", vec![-1, labels]),
        ],
    )
}

/// The largest batch a request may send: the batcher's `max_batch`, but
/// never more samples than a request may hold.
pub fn max_batch_size(app: &AppState, spec: &config::ModelSpec) -> u32 {
    let per_request = u32::try_from(app.core.cfg.limits.max_images_per_request).unwrap_or(u32::MAX);
    spec.batching.max_batch.min(per_request)
}

/// The platform name a model is shown under.
pub fn platform(spec: &config::ModelSpec) -> String {
    format!("mmgate_{}", spec.backend.as_str())
}

/// The protocol extensions served (shared memory only when allowed).
pub fn extensions(app: &AppState) -> Vec<&'static str> {
    let mut e = vec!["binary_tensor_data", "model_configuration"];
    if app.core.cfg.server.allow_client_shm {
        e.push("system_shared_memory");
    }
    e
}

async fn server_metadata(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "name": "mmgate",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": extensions(&app),
    }))
}

async fn server_ready(State(app): State<AppState>) -> StatusCode {
    if crate::api::not_ready(&app).is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The input's shape with `-1` for the batch dimension.
fn input_dims(spec: &config::ModelSpec) -> Vec<i64> {
    spec.input.batch_shape(1)[1..]
        .iter()
        .map(|&d| d as i64)
        .collect()
}

async fn model_metadata(
    State(app): State<AppState>,
    path: Result<Path<Vec<(String, String)>>, PathRejection>,
) -> Response {
    match model_of(&app, path) {
        Err(e) => error_response(e),
        Ok((_, spec)) => {
            let (inputs, outputs) = tensors(&spec);
            let list = |v: Vec<TensorMeta>| {
                v.into_iter()
                    .map(|(name, datatype, shape)| json!({"name": name, "datatype": datatype, "shape": shape}))
                    .collect::<Vec<_>>()
            };
            Json(json!({
                "name": spec.name,
                "versions": [VERSION],
                "platform": platform(&spec),
                "inputs": list(inputs),
                "outputs": list(outputs),
            }))
            .into_response()
        }
    }
}

async fn model_ready(
    State(app): State<AppState>,
    path: Result<Path<Vec<(String, String)>>, PathRejection>,
) -> Response {
    match model_of(&app, path) {
        Err(e) => error_response(e),
        Ok((_, spec)) if model_is_ready(&app, &spec) => StatusCode::OK.into_response(),
        Ok((_, spec)) => error_response(ApiError::new(
            Code::ModelNotLoaded,
            format!("model {:?} is not ready", spec.name),
        )),
    }
}

/// The region named in the path, if any.
fn region_of(path: Option<Path<String>>) -> Option<String> {
    path.map(|Path(r)| r)
}

#[derive(Debug, Deserialize)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

/// The tenant making a shared-memory call (its key, when tenants are
/// configured), from a peer on this host: a region is a file of this host.
pub fn shm_caller(
    app: &AppState,
    headers: &axum::http::HeaderMap,
    peer: Option<std::net::SocketAddr>,
) -> Result<String, ApiError> {
    app.client_shm.check_enabled()?;
    crate::client_shm::check_local(peer)?;
    app.auth.current().tenant_name(headers)
}

type Peer = axum::extract::ConnectInfo<std::net::SocketAddr>;

fn peer_of(p: Peer) -> Option<std::net::SocketAddr> {
    Some(p.0)
}

async fn shm_status(
    State(app): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
    region: Option<Path<String>>,
) -> Response {
    let r = shm_caller(&app, &headers, peer_of(peer))
        .and_then(|t| app.client_shm.status(&t, region_of(region).as_deref()));
    match r {
        Ok(list) => Json(list).into_response(),
        Err(e) => error_response(e),
    }
}

async fn shm_register(
    State(app): State<AppState>,
    peer: Peer,
    Path(region): Path<String>,
    req: Request,
) -> Response {
    // Refused before the body is read, when it is.
    let tenant = match shm_caller(&app, req.headers(), peer_of(peer)) {
        Ok(t) => t,
        Err(e) => return closing(e),
    };
    // A small body, counted and timed as an upload; JSON whatever its
    // Content-Type (Triton's client sends none).
    let reservation = app.body_budget.reserve();
    let req = req.map(|b| {
        axum::body::Body::new(crate::body::Metered::with_limits(
            b,
            reservation.clone(),
            &app.core.cfg.http,
        ))
    });
    let r = match crate::score::read_within(req, crate::body::SMALL_BODY_BYTES, false).await {
        Ok(body) => serde_json::from_slice::<RegisterBody>(&body)
            .map_err(|e| bad(format!("bad register body: {e}")))
            .and_then(|b| {
                app.client_shm
                    .register(&tenant, &region, &b.key, b.offset, b.byte_size)
            }),
        Err(e) => Err(e),
    };
    done(r)
}

async fn shm_unregister(
    State(app): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
    region: Option<Path<String>>,
) -> Response {
    let r = shm_caller(&app, &headers, peer_of(peer))
        .and_then(|t| app.client_shm.unregister(&t, region_of(region).as_deref()));
    done(r)
}

/// The CUDA shared-memory extension without a GPU (see
/// [`crate::client_shm::Regions::cuda_status`]): the same access rules as system
/// shared memory, and never a region.
async fn cuda_status(
    State(app): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
    region: Option<Path<String>>,
) -> Response {
    let r = shm_caller(&app, &headers, peer_of(peer))
        .and_then(|_| app.client_shm.cuda_status(region_of(region).as_deref()));
    match r {
        Ok(()) => Json(json!([])).into_response(),
        Err(e) => error_response(e),
    }
}

async fn cuda_register(
    State(app): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
) -> Response {
    done(shm_caller(&app, &headers, peer_of(peer)).and_then(|_| app.client_shm.cuda_register()))
}

async fn cuda_unregister(
    State(app): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
) -> Response {
    done(shm_caller(&app, &headers, peer_of(peer)).and_then(|_| app.client_shm.cuda_unregister()))
}

/// A call that answers nothing on success: 200 with no body, or the
/// protocol's error.
fn done(r: Result<(), ApiError>) -> Response {
    match r {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => error_response(e),
    }
}

/// Triton's model-configuration extension, which perf_analyzer reads first.
async fn model_config(
    State(app): State<AppState>,
    path: Result<Path<Vec<(String, String)>>, PathRejection>,
) -> Response {
    match model_of(&app, path) {
        Err(e) => error_response(e),
        Ok((_, spec)) => Json(json!({
            "name": spec.name,
            "platform": platform(&spec),
            "max_batch_size": max_batch_size(&app, &spec),
            "input": [if takes_fp32(&spec) {
                json!({
                    "name": spec.input.name,
                    "data_type": "TYPE_FP32",
                    "format": match spec.input.layout {
                        config::Layout::Nhwc => "FORMAT_NHWC",
                        config::Layout::Nchw => "FORMAT_NCHW",
                    },
                    "dims": input_dims(&spec),
                })
            } else {
                json!({
                    "name": spec.input.name,
                    "data_type": "TYPE_STRING",
                    "format": "FORMAT_NONE",
                    "dims": [1],
                })
            }],
            "output": [
                {"name": "scores", "data_type": "TYPE_FP32", "dims": [spec.output.labels.len()]},
                {"name": "labels", "data_type": "TYPE_STRING", "dims": [spec.output.labels.len()]},
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": spec.batching.max_queue_delay_us,
            },
            "instance_group": [{"count": spec.instances.count, "kind": "KIND_CPU"}],
        }))
        .into_response(),
    }
}

async fn infer(
    State(app): State<AppState>,
    path: Result<Path<Vec<(String, String)>>, PathRejection>,
    req: Request,
) -> Response {
    let Ok(Path(parts)) = path else {
        return closing(bad("bad path"));
    };
    let get = |k: &str| parts.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let name = get("model").unwrap_or_default();
    if let Some(v) = get("version")
        && let Err(e) = model(&app, &name, &v)
    {
        return closing(e);
    }
    // An unknown model is answered (and counted) by the request path.
    crate::api::serve_scoring(app, name, req, crate::api::Front::V2).await
}

/// An error answered before the body was read: the connection closes
/// (lingering).
fn closing(e: ApiError) -> Response {
    let mut r = error_response(e);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

// ---------------------------------------------------------------- requests

#[derive(Debug, Deserialize)]
struct RequestHeader {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputHeader>,
    #[serde(default)]
    outputs: Vec<OutputHeader>,
}

#[derive(Debug, Deserialize)]
struct InputHeader {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// Parsed only once the datatype and count are known, with at most
    /// that many elements: a long array costs no more than its values.
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Deserialize)]
struct OutputHeader {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Longest tensor name or datatype, and highest rank, a request may have:
/// errors echo them, so an answer stays short whatever the request.
const MAX_NAME_BYTES: usize = 256;
const MAX_RANK: usize = 8;

/// Refuses, without echoing them, names, datatypes and shapes past
/// [`MAX_NAME_BYTES`] and [`MAX_RANK`], before anything else is checked.
fn check_echoed(head: &RequestHeader) -> Result<(), ApiError> {
    let names = head.inputs.iter().flat_map(|i| [&i.name, &i.datatype]);
    if names
        .chain(head.outputs.iter().map(|o| &o.name))
        .any(|n| n.len() > MAX_NAME_BYTES)
    {
        return Err(bad(format!(
            "a tensor name or datatype is over {MAX_NAME_BYTES} bytes"
        )));
    }
    if head.inputs.iter().any(|i| i.shape.len() > MAX_RANK) {
        return Err(bad(format!("a shape has more than {MAX_RANK} dimensions")));
    }
    Ok(())
}

/// The one input, decoded.
#[derive(Debug, PartialEq)]
pub enum Tensor {
    /// `N` samples of the model's input, as `f32`s, in order.
    Fp32 { n: usize, values: Vec<f32> },
    /// `N` encoded images.
    Bytes(Vec<Bytes>),
}

/// A parsed `infer` request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    pub input: Tensor,
    /// Outputs asked for, and whether each is wanted as binary data.
    pub outputs: Vec<(String, bool)>,
    /// Outputs to write into a client's shared-memory region instead.
    pub shm_outputs: Vec<ShmOutput>,
}

/// An output written into a registered region.
#[derive(Debug)]
pub struct ShmOutput {
    pub name: String,
    pub region_name: String,
    pub region: std::sync::Arc<crate::client_shm::Region>,
    pub offset: u64,
    pub byte_size: u64,
}

/// A region, offset and size from a tensor's parameters, if it names one.
fn shm_params(p: &Map<String, Value>, what: &str) -> Result<Option<(String, u64, u64)>, ApiError> {
    let Some(region) = p.get("shared_memory_region") else {
        return Ok(None);
    };
    let region = region
        .as_str()
        .ok_or_else(|| bad(format!("{what}: shared_memory_region is not a name")))?;
    let size = p
        .get("shared_memory_byte_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("{what}: shared_memory_byte_size is missing")))?;
    let offset = match p.get("shared_memory_offset") {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(format!("{what}: shared_memory_offset is not an offset")))?,
    };
    Ok(Some((region.to_string(), offset, size)))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::BadRequest, msg)
}

fn param_bool(p: &Map<String, Value>, key: &str) -> bool {
    p.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Parses an `infer` body: JSON, or with `header_len`, a JSON header of
/// that length followed by the inputs' binary data.
pub fn parse(
    body: &Bytes,
    header_len: Option<usize>,
    spec: &config::ModelSpec,
    max_samples: usize,
    regions: &crate::client_shm::Scope<'_>,
) -> Result<InferRequest, ApiError> {
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length is {json_len} but the body has {} bytes",
            body.len()
        )));
    }
    let head: RequestHeader = serde_json::from_slice(&body[..json_len])
        .map_err(|e| bad(format!("the request is not a valid inference request: {e}")))?;
    check_echoed(&head)?;
    let mut binary = body.slice(json_len..);
    let mut input = None;
    for i in head.inputs {
        let size = i.parameters.get("binary_data_size").map(|v| {
            v.as_u64().map(|n| n as usize).ok_or_else(|| {
                bad(format!(
                    "input {:?}: binary_data_size is not a size",
                    i.name
                ))
            })
        });
        let shm = shm_params(&i.parameters, &format!("input {:?}", i.name))?;
        let data = match (size.transpose()?, i.data) {
            (None, None) if shm.is_some() => {
                let (region, offset, size) = shm.expect("checked");
                // Raw tensors only: no region's bytes are ever echoed.
                if i.datatype != "FP32" {
                    return Err(bad(format!(
                        "input {:?}: only FP32 tensors are read from shared memory",
                        i.name
                    )));
                }
                // At most what the request may hold.
                let max = spec.input.sample_bytes().saturating_mul(max_samples);
                if size as usize > max {
                    return Err(bad(format!(
                        "input {:?}: shared_memory_byte_size {size} is over {max}",
                        i.name
                    )));
                }
                Data::Binary(Bytes::from(regions.get(&region)?.read(offset, size)?))
            }
            _ if shm.is_some() => {
                return Err(bad(format!(
                    "input {:?} has both shared memory and data",
                    i.name
                )));
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(bad(format!(
                        "input {:?}: binary_data_size is {n} but {} bytes of binary data are left",
                        i.name,
                        binary.len()
                    )));
                }
                Data::Binary(binary.split_to(n))
            }
            (None, Some(v)) => Data::Json(v),
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input {:?} has both data and binary_data_size",
                    i.name
                )));
            }
            (None, None) => return Err(bad(format!("input {:?} has no data", i.name))),
        };
        if i.name != spec.input.name {
            return Err(bad(format!(
                "unexpected input {:?}: model {:?} takes one input, {:?}",
                i.name, spec.name, spec.input.name
            )));
        }
        if input.is_some() {
            return Err(bad(format!("input {:?} is given twice", i.name)));
        }
        input = Some(tensor(
            &i.name,
            &i.datatype,
            &i.shape,
            data,
            spec,
            max_samples,
        )?);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            binary.len()
        )));
    }
    let input = input.ok_or_else(|| {
        bad(format!(
            "missing input {:?} of model {:?}",
            spec.input.name, spec.name
        ))
    })?;
    let all_binary = param_bool(&head.parameters, "binary_data_output");
    // No outputs named: all of them.
    let outputs = if head.outputs.is_empty() {
        vec![
            ("scores".to_string(), all_binary),
            ("labels".to_string(), all_binary),
        ]
    } else {
        let mut v = Vec::new();
        for o in &head.outputs {
            if o.name != "scores" && o.name != "labels" {
                return Err(bad(format!(
                    "unknown output {:?}: the outputs are \"scores\" and \"labels\"",
                    o.name
                )));
            }
            let binary = param_bool(&o.parameters, "binary_data")
                || (all_binary && !o.parameters.contains_key("binary_data"));
            v.push((o.name.clone(), binary));
        }
        v
    };
    if head.id.as_ref().is_some_and(|id| id.len() > MAX_ID_BYTES) {
        return Err(bad(format!("the request id is over {MAX_ID_BYTES} bytes")));
    }
    let mut shm_outputs = Vec::new();
    for o in &head.outputs {
        if let Some((region_name, offset, byte_size)) =
            shm_params(&o.parameters, &format!("output {:?}", o.name))?
        {
            let region = regions.get(&region_name)?;
            // Checked now, before any work: the window lies in the region.
            region.window(offset, byte_size)?;
            shm_outputs.push(ShmOutput {
                name: o.name.clone(),
                region,
                region_name,
                offset,
                byte_size,
            });
        }
    }
    Ok(InferRequest {
        id: head.id,
        input,
        outputs,
        shm_outputs,
    })
}

enum Data {
    Json(Box<serde_json::value::RawValue>),
    Binary(Bytes),
}

fn tensor(
    name: &str,
    datatype: &str,
    shape: &[i64],
    data: Data,
    spec: &config::ModelSpec,
    max_samples: usize,
) -> Result<Tensor, ApiError> {
    let n = shape.first().copied().unwrap_or(0);
    if n < 1 || n as usize > max_samples {
        return Err(bad(format!(
            "input {name:?}: the batch dimension is {n}; it must be 1 to {max_samples}"
        )));
    }
    let n = n as usize;
    match datatype {
        "FP32" => {
            let dims = input_dims(spec);
            if shape[1..] != dims[..] {
                return Err(bad(format!(
                    "input {name:?}: shape {shape:?} does not match the model's [N, {}]",
                    dims.iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let count = n * spec.input.elements();
            let values = match data {
                Data::Binary(b) => {
                    if b.len() != count * 4 {
                        return Err(bad(format!(
                            "input {name:?}: {} bytes of binary data for {count} FP32 values ({} bytes)",
                            b.len(),
                            count * 4
                        )));
                    }
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
                Data::Json(v) => {
                    let out: Vec<f32> = limited_array(v.get(), count).map_err(|e| {
                        bad(format!(
                            "input {name:?}: FP32 data must be an array (flat or nested, row-major) of {count} numbers: {e}"
                        ))
                    })?;
                    if out.len() != count {
                        return Err(bad(format!(
                            "input {name:?}: {} values for shape {shape:?} ({count})",
                            out.len()
                        )));
                    }
                    out
                }
            };
            Ok(Tensor::Fp32 { n, values })
        }
        "BYTES" => {
            if !(shape.len() == 1 || shape.len() == 2 && shape[1] == 1) {
                return Err(bad(format!(
                    "input {name:?}: BYTES (encoded images) takes shape [N] or [N, 1], not {shape:?}"
                )));
            }
            let items = match data {
                Data::Binary(b) => {
                    split_bytes(b, n).map_err(|e| bad(format!("input {name:?}: {e}")))?
                }
                Data::Json(v) => limited_array::<String>(v.get(), n)
                    .map_err(|e| {
                        bad(format!(
                            "input {name:?}: BYTES data must be an array of {n} strings: {e}"
                        ))
                    })?
                    .into_iter()
                    .map(|s| Bytes::from(s.into_bytes()))
                    .collect(),
            };
            if items.len() != n {
                return Err(bad(format!(
                    "input {name:?}: {} elements for shape {shape:?}",
                    items.len()
                )));
            }
            Ok(Tensor::Bytes(items))
        }
        other => Err(bad(format!(
            "input {name:?}: datatype {:?} is not taken; use FP32 (the model's input) or BYTES (encoded images)",
            crate::error::clip(other)
        ))),
    }
}

/// The elements of a JSON array, flat or nested (row-major, as the
/// protocol allows either), refused past `max` before more are built.
fn limited_array<T: serde::de::DeserializeOwned>(raw: &str, max: usize) -> Result<Vec<T>, String> {
    use serde::de::{DeserializeSeed, Error, IntoDeserializer, SeqAccess, Visitor};
    /// Nesting deeper than any tensor's rank.
    const MAX_DEPTH: usize = 8;
    /// One element, or a nested array of them, appended to `out`.
    struct Into<'a, T> {
        out: &'a mut Vec<T>,
        max: usize,
        depth: usize,
    }
    impl<T: serde::de::DeserializeOwned> Into<'_, T> {
        fn push<E: Error>(self, x: T) -> Result<(), E> {
            if self.out.len() == self.max {
                return Err(E::custom(format!("more than {} elements", self.max)));
            }
            self.out.push(x);
            Ok(())
        }
        fn scalar<'de, E: Error, D: serde::Deserializer<'de, Error = E>>(
            self,
            d: D,
        ) -> Result<(), E> {
            let x = T::deserialize(d)?;
            self.push(x)
        }
    }
    impl<'de, T: serde::de::DeserializeOwned> Visitor<'de> for Into<'_, T> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "an array of at most {} elements", self.max)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            if self.depth == MAX_DEPTH {
                return Err(A::Error::custom("arrays nested too deep"));
            }
            let (out, max, depth) = (self.out, self.max, self.depth + 1);
            while seq
                .next_element_seed(Into {
                    out: &mut *out,
                    max,
                    depth,
                })?
                .is_some()
            {}
            Ok(())
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<(), E> {
            self.scalar(v.into_deserializer())
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<(), E> {
            self.scalar(v.into_deserializer())
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<(), E> {
            self.scalar(v.into_deserializer())
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<(), E> {
            self.scalar(v.into_deserializer())
        }
        fn visit_bool<E: Error>(self, v: bool) -> Result<(), E> {
            self.scalar(v.into_deserializer())
        }
    }
    impl<'de, T: serde::de::DeserializeOwned> DeserializeSeed<'de> for Into<'_, T> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_str(raw);
    let top = Into {
        out: &mut out,
        max,
        depth: 0,
    };
    // The top level is an array, not a lone element.
    serde::Deserializer::deserialize_seq(&mut de, top).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(out)
}

/// BYTES elements in the binary extension: each a 4-byte little-endian
/// length, then that many bytes.
fn split_bytes(mut b: Bytes, max: usize) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if out.len() == max {
            return Err(format!("more than the {max} elements of its shape"));
        }
        if b.len() < 4 {
            return Err("a BYTES element's length is cut off".into());
        }
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let _ = b.split_to(4);
        if len > b.len() {
            return Err(format!(
                "a BYTES element claims {len} bytes but {} are left",
                b.len()
            ));
        }
        out.push(b.split_to(len));
    }
    Ok(out)
}

// ---------------------------------------------------------------- running

/// An `infer` answer.
#[derive(Debug)]
pub struct InferResponse {
    model: String,
    id: Option<String>,
    /// One row of scores per sample, in the model's label order.
    rows: Vec<Vec<f32>>,
    labels: Vec<String>,
    outputs: Vec<(String, bool)>,
    shm_outputs: Vec<ShmOutput>,
    pub timings: Timings,
}

/// Reads the body and runs the request: the `/v2` part of
/// [`crate::api`]'s scoring request, with its caller and context.
pub async fn run(
    app: &AppState,
    ctx: &RequestContext,
    caller: &Caller,
    model: u16,
    body: Bytes,
    header_len: Option<usize>,
    peer: Option<std::net::SocketAddr>,
) -> Result<InferResponse, ApiError> {
    let started = Instant::now();
    let spec = &app.core.cfg.models[model as usize];
    let max = app.core.cfg.limits.max_images_per_request;
    let regions = app.client_shm.scope(&caller.tenant, peer);
    let req = parse(&body, header_len, spec, max, &regions)?;
    drop(body);
    let (rows, mut timings) = match req.input {
        Tensor::Bytes(images) => {
            let uploads = images
                .into_iter()
                .map(|data| Upload { name: None, data })
                .collect();
            let (results, timings) = score::score_all(app, ctx, caller, model, uploads).await?;
            let rows = results
                .iter()
                .map(|r| {
                    spec.output
                        .labels
                        .iter()
                        .map(|l| r.scores.get(l).and_then(Value::as_f64).unwrap_or(f64::NAN) as f32)
                        .collect()
                })
                .collect();
            (rows, timings)
        }
        Tensor::Fp32 { n, values } => raw(app, ctx, caller, model, n, values).await?,
    };
    timings.total_ms = score::ms(started.elapsed());
    Ok(InferResponse {
        model: spec.name.clone(),
        id: req.id,
        rows,
        labels: spec.output.labels.clone(),
        outputs: req.outputs,
        shm_outputs: req.shm_outputs,
        timings,
    })
}

/// Raw tensors: each sample written into a shared-memory slot from here and
/// sent to the executor's batcher, all at once, answered in order.
async fn raw(
    app: &AppState,
    ctx: &RequestContext,
    caller: &Caller,
    model: u16,
    n: usize,
    values: Vec<f32>,
) -> Result<(Vec<Vec<f32>>, Timings), ApiError> {
    let core = &app.core;
    let spec = &core.cfg.models[model as usize];
    // Its slots hold pixels, which a normalised tensor cannot be turned
    // back into: such a model takes encoded images (BYTES) only.
    if spec.slot_dtype == config::SlotDtype::Uint8 {
        return Err(bad(format!(
            "model {:?} takes encoded images only (BYTES): its slots hold uint8 pixels (slot_dtype = \"uint8\"), so FP32 tensors cannot be served",
            spec.name
        )));
    }
    let samples = u32::try_from(n).unwrap_or(u32::MAX);
    caller.take_samples(samples)?;
    let per = spec.input.elements();
    let critical = ctx.class == config::Class::Critical;
    let wait = Duration::from_millis(core.cfg.server.queue_timeout_ms);
    // Samples still to be sent tell the batcher to wait for them.
    let mut pending: Vec<_> = (0..n).map(|_| core.pending_guard(model)).collect();
    let values = &values;
    let futs = (0..n).map(|i| {
        let guard = pending.pop().expect("one per sample");
        async move {
            let t = Instant::now();
            let lease = tokio::time::timeout(wait, core.ledger.lease_for(model, critical))
                .await
                .map_err(|_| {
                    ApiError::new(
                        Code::QueueTimeout,
                        format!("no tensor slot was free within {} ms", wait.as_millis()),
                    )
                })?
                .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
            let queued = t.elapsed();
            core.ledger
                .tensors()
                .write_f32(lease.slot(), |buf| {
                    buf.copy_from_slice(&values[i * per..(i + 1) * per]);
                })
                .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
            drop(guard);
            let s = score::infer_sample(app, ctx, model, lease).await?;
            Ok::<_, ApiError>((s, queued))
        }
    });
    let answers = futures::future::join_all(futs).await;
    if answers
        .iter()
        .all(|r| r.as_ref().is_err_and(|e| e.code.is_overload()))
    {
        caller.refund_samples(samples);
    }
    let mut rows = Vec::with_capacity(n);
    let mut timings = Timings::default();
    for (i, a) in answers.into_iter().enumerate() {
        let (s, queued) = a.map_err(|e| {
            if n == 1 {
                e
            } else {
                e.context(&format!("sample {} of {n}", i + 1))
            }
        })?;
        timings.queue_ms = timings.queue_ms.max(score::ms(queued));
        timings.batch_wait_ms = timings.batch_wait_ms.max(s.queue_us as f64 / 1e3);
        timings.inference_ms = timings.inference_ms.max(s.infer_us as f64 / 1e3);
        rows.push(s.values);
    }
    Ok((rows, timings))
}

impl InferResponse {
    /// The answer as JSON, or as a JSON header and binary data when an
    /// output was asked for as binary.
    pub fn into_response(self) -> Response {
        let n = self.rows.len();
        let l = self.labels.len();
        let mut outputs = Vec::new();
        let mut binary = BytesMut::new();
        for (name, as_binary) in &self.outputs {
            let (datatype, data, raw): (&str, Value, Vec<u8>) = if name == "scores" {
                let flat: Vec<f32> = self.rows.iter().flatten().copied().collect();
                let raw = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
                ("FP32", json!(flat), raw)
            } else {
                let names: Vec<&str> = (0..n)
                    .flat_map(|_| self.labels.iter().map(String::as_str))
                    .collect();
                let mut raw = Vec::new();
                for s in &names {
                    raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    raw.extend_from_slice(s.as_bytes());
                }
                ("BYTES", json!(names), raw)
            };
            let mut o = json!({"name": name, "datatype": datatype, "shape": [n, l]});
            if let Some(to) = self.shm_outputs.iter().find(|t| &t.name == name) {
                if raw.len() as u64 > to.byte_size {
                    return error_response(bad(format!(
                        "output {name:?} is {} bytes; its shared_memory_byte_size is {}",
                        raw.len(),
                        to.byte_size
                    )));
                }
                if let Err(e) = to.region.write(to.offset, &raw) {
                    return error_response(e);
                }
                // As Triton answers: name, datatype and shape only. Its C++
                // client (perf_analyzer's) reads any output `parameters` as
                // binary data and fails without `binary_data_size`.
            } else if *as_binary {
                o["parameters"] = json!({"binary_data_size": raw.len()});
                binary.extend_from_slice(&raw);
            } else {
                o["data"] = data;
            }
            outputs.push(o);
        }
        let t = self.timings;
        let mut head = json!({
            "model_name": self.model,
            "model_version": VERSION,
            "outputs": outputs,
            "parameters": {
                "queue_ms": t.queue_ms,
                "decode_ms": t.decode_ms,
                "batch_wait_ms": t.batch_wait_ms,
                "inference_ms": t.inference_ms,
                "total_ms": t.total_ms,
            },
        });
        if let Some(id) = &self.id {
            head["id"] = json!(id);
        }
        let head = serde_json::to_vec(&head).expect("JSON");
        if binary.is_empty() {
            return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
        }
        let len = head.len();
        let mut body = BytesMut::with_capacity(len + binary.len());
        body.extend_from_slice(&head);
        body.extend_from_slice(&binary);
        (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    len.to_string(),
                ),
            ],
            body.freeze(),
        )
            .into_response()
    }
}

/// `Inference-Header-Content-Length`, if given.
pub fn header_len(headers: &axum::http::HeaderMap) -> Result<Option<usize>, ApiError> {
    headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length is not a length"))
        })
        .transpose()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn spec() -> config::ModelSpec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs/models/open_nsfw.toml");
        config::ModelSpec::load(&path).unwrap()
    }

    /// `parse` with the shared-memory extension off, as tenant `t`, at
    /// most 8 samples.
    pub(crate) fn parse_off(
        body: &Bytes,
        len: Option<usize>,
        s: &config::ModelSpec,
    ) -> Result<InferRequest, ApiError> {
        let off = crate::client_shm::Regions::new(false);
        parse(body, len, s, 8, &off.scope("t", None))
    }

    fn binary(head: Value, data: &[u8]) -> (Bytes, usize) {
        let mut b = serde_json::to_vec(&head).unwrap();
        let len = b.len();
        b.extend_from_slice(data);
        (b.into(), len)
    }

    #[test]
    fn json_data_may_be_nested_as_the_protocol_allows() {
        let s = spec();
        let flat = json!({"inputs": [{"name": "input:0", "shape": [2], "datatype": "BYTES",
            "data": ["a", "b"]}]});
        let nested = json!({"inputs": [{"name": "input:0", "shape": [2, 1], "datatype": "BYTES",
            "data": [["a"], ["b"]]}]});
        let parse = |v: &Value| parse_off(&serde_json::to_vec(v).unwrap().into(), None, &s);
        assert_eq!(parse(&flat).unwrap().input, parse(&nested).unwrap().input);
        // Still bounded: one element past the shape, or nested too deep.
        let over = json!({"inputs": [{"name": "input:0", "shape": [2, 1], "datatype": "BYTES",
            "data": [["a"], ["b", "c"]]}]});
        assert!(parse(&over).is_err());
        let deep = json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "BYTES",
            "data": [[[[[[[[[["a"]]]]]]]]]]}]});
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn errors_echo_no_long_name_or_shape() {
        let s = spec();
        let long = "x".repeat(100_000);
        let dims = vec![1; 100_000];
        for head in [
            json!({"inputs": [{"name": long, "shape": [1], "datatype": "FP32", "data": [1]}]}),
            json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": long, "data": [1]}]}),
            json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": long}]}),
            json!({"inputs": [{"name": "input:0", "shape": dims, "datatype": "FP32", "data": [1]}]}),
        ] {
            let e = parse_off(&serde_json::to_vec(&head).unwrap().into(), None, &s).unwrap_err();
            assert!(e.message.len() < 1000, "{} bytes echoed", e.message.len());
        }
    }

    #[test]
    fn binary_bytes_and_fp32_inputs_parse() {
        let s = spec();
        let mut elems = Vec::new();
        for img in [&b"abc"[..], &b"de"[..]] {
            elems.extend_from_slice(&(img.len() as u32).to_le_bytes());
            elems.extend_from_slice(img);
        }
        let head = json!({"id": "7", "inputs": [{"name": "input:0", "shape": [2], "datatype": "BYTES",
            "parameters": {"binary_data_size": elems.len()}}],
            "outputs": [{"name": "scores", "parameters": {"binary_data": true}}, {"name": "labels"}]});
        let (body, len) = binary(head, &elems);
        let r = parse_off(&body, Some(len), &s).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(
            r.input,
            Tensor::Bytes(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")])
        );
        assert_eq!(
            r.outputs,
            [("scores".to_string(), true), ("labels".to_string(), false)]
        );

        let count = s.input.elements();
        let raw: Vec<u8> = (0..count).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let head = json!({"inputs": [{"name": "input:0", "shape": [1, 224, 224, 3], "datatype": "FP32",
            "parameters": {"binary_data_size": raw.len()}}], "parameters": {"binary_data_output": true}});
        let (body, len) = binary(head, &raw);
        let r = parse_off(&body, Some(len), &s).unwrap();
        match r.input {
            Tensor::Fp32 { n: 1, values } => assert_eq!(values[5], 5.0),
            other => panic!("{other:?}"),
        }
        // No outputs named: all, as binary.
        assert_eq!(
            r.outputs,
            [("scores".to_string(), true), ("labels".to_string(), true)]
        );
    }

    #[test]
    fn a_uint8_slot_model_advertises_encoded_images_not_fp32() {
        let mut s = spec();
        let (inputs, _) = tensors(&s);
        assert_eq!(inputs[0].1, "FP32");
        s.slot_dtype = config::SlotDtype::Uint8;
        let (inputs, _) = tensors(&s);
        assert_eq!((inputs[0].1, inputs[0].2.clone()), ("BYTES", vec![-1, 1]));
    }

    #[test]
    fn malformed_requests_are_400_with_a_reason() {
        let s = spec();
        let fp32 = |shape: Value, size: usize| {
            json!({"inputs": [{"name": "input:0", "shape": shape, "datatype": "FP32",
                "parameters": {"binary_data_size": size}}]})
        };
        let n = s.input.sample_bytes();
        let cases: Vec<(Bytes, Option<usize>, &str)> = vec![
            // wrong datatype
            {
                let (b, l) = binary(
                    json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "INT8", "data": [1]}]}),
                    &[],
                );
                (b, Some(l), "datatype")
            },
            // wrong shape
            {
                let (b, l) = binary(fp32(json!([1, 3, 224, 224]), n), &vec![0; n]);
                (b, Some(l), "does not match")
            },
            // missing input
            {
                let (b, l) = binary(json!({"inputs": []}), &[]);
                (b, Some(l), "missing input")
            },
            // header length beyond the body
            (
                Bytes::from_static(b"{\"inputs\": []}"),
                Some(1000),
                "but the body has",
            ),
            // a binary size that does not match
            {
                let (b, l) = binary(fp32(json!([1, 224, 224, 3]), n), &vec![0; n - 4]);
                (b, Some(l), "binary_data_size")
            },
            {
                let (b, l) = binary(fp32(json!([1, 224, 224, 3]), n - 4), &vec![0; n - 4]);
                (b, Some(l), "bytes of binary data")
            },
            // trailing data
            {
                let (b, l) = binary(fp32(json!([1, 224, 224, 3]), n), &vec![0; n + 3]);
                (b, Some(l), "follow")
            },
            // a BYTES element cut off
            {
                let (b, l) = binary(
                    json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 6}}]}),
                    &[9, 0, 0, 0, 1, 2],
                );
                (b, Some(l), "claims 9 bytes")
            },
            // another input's name
            {
                let (b, l) = binary(
                    json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}),
                    &[],
                );
                (b, Some(l), "unexpected input")
            },
            (Bytes::from_static(b"not json"), None, "not a valid"),
            // too many samples
            {
                let (b, l) = binary(
                    json!({"inputs": [{"name": "input:0", "shape": [9], "datatype": "BYTES",
                    "data": ["a","a","a","a","a","a","a","a","a"]}]}),
                    &[],
                );
                (b, Some(l), "batch dimension")
            },
        ];
        for (body, len, want) in cases {
            let e = parse_off(&body, len, &s).unwrap_err();
            assert_eq!(e.code, Code::BadRequest, "{}", e.message);
            assert!(e.message.contains(want), "{want:?} not in {:?}", e.message);
        }
    }
}
