//! The KServe v2 / Open Inference Protocol, checked with the official
//! Triton Python client (`tritonclient`, installed by `setup.sh test` into
//! `.deps/triton-venv`) running `tests/kserve/conformance.py`: every score
//! equals the `/v1` path's score on the same image. Malformed requests get
//! a 400 with the protocol's error body.

mod common;

use std::time::Duration;

use common::{Gateway, fixture, repo};

/// A solid-colour PNG: its preprocessed tensor is the same value in every
/// position, so a raw tensor can be built for it exactly.
const FLAT_RGB: [u8; 3] = [200, 50, 10];

fn flat_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(320, 240, image::Rgb(FLAT_RGB));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The flat image's tensor values, per channel in the model's order.
fn flat_pixel(spec: &config::ModelSpec) -> [f32; 3] {
    let p = &spec.preprocess;
    let [r, g, b] = FLAT_RGB.map(f32::from);
    let ordered = match p.color_order {
        config::ColorOrder::Rgb => [r, g, b],
        config::ColorOrder::Bgr => [b, g, r],
    };
    std::array::from_fn(|c| (ordered[c] * p.scale - p.mean[c]) / p.std[c])
}

fn scores(reply: &common::Reply) -> serde_json::Value {
    assert_eq!(reply.status, 200, "{}", reply.json);
    reply.json["results"][0]["scores"].clone()
}

/// Runs the conformance script against `gw` (as the tenant with `key`, if
/// given); answers its output.
async fn conformance(gw: &Gateway, key: Option<&str>, shm: bool) -> String {
    let python = repo().join(".deps/triton-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `bash scripts/setup.sh test` (or `make test`)",
        python.display()
    );
    let spec = config::ModelSpec::load(&repo().join("configs/models/open_nsfw.toml")).unwrap();
    let score = |body: Vec<u8>, ctype: &'static str| {
        let mut req = gw
            .client
            .post(gw.url("/v1/models/open_nsfw/score"))
            .header("content-type", ctype)
            .body(body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req
    };
    let jpeg = repo().join("tests/fixtures/images/coffee.jpg");
    let jpeg_scores =
        scores(&common::Reply::of(score(fixture("images/coffee.jpg"), "image/jpeg")).await);
    let flat = std::env::temp_dir().join(format!("mmgate-flat-{}.png", std::process::id()));
    std::fs::write(&flat, flat_png()).unwrap();
    let flat_scores = scores(&common::Reply::of(score(flat_png(), "image/png")).await);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(repo().join("tests/kserve/conformance.py"))
            .env("HTTP_URL", &gw.addr)
            .env("GRPC_URL", gw.grpc_addr.clone().unwrap_or_default())
            .env("KEY", key.unwrap_or_default())
            .env("SHM", if shm { "1" } else { "0" })
            .env("ALIAS", if key.is_some() { "moderation" } else { "" })
            .env("MODEL", "open_nsfw")
            .env("JPEG", &jpeg)
            .env("JPEG_SCORES", jpeg_scores.to_string())
            .env("FLAT", &flat)
            .env("FLAT_SCORES", flat_scores.to_string())
            .env(
                "FLAT_PIXEL",
                serde_json::to_string(&flat_pixel(&spec)).unwrap(),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the conformance run took over 120 s")
    .expect("python runs");
    let _ = std::fs::remove_file(&flat);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("conformance: all checks passed"), "{text}");
    text
}

/// HTTP and gRPC: metadata, readiness, BYTES-JPEG, binary and JSON FP32,
/// a batch, gRPC raw and BYTES, and tensors through registered shared
/// memory; every score the /v1 score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_triton_client_gets_the_v1_scores_over_kserve_v2() {
    let gw = Gateway::start_with(
        "",
        &[
            ("MMGATE_GRPC_LISTEN", "127.0.0.1:0"),
            ("MMGATE_ALLOW_CLIENT_SHM", "true"),
        ],
    )
    .await;
    assert!(gw.grpc_addr.is_some());
    let text = conformance(&gw, None, true).await;
    assert!(text.contains("ok   gRPC BYTES jpeg"), "{text}");
    assert!(text.contains("ok   HTTP shared-memory infer"), "{text}");
    assert!(text.contains("ok   gRPC shared-memory infer"), "{text}");
    // The v2 requests are counted like /v1 ones.
    let v2 = gw
        .metric("mmgate_requests_total", "code=\"200\",model=\"open_nsfw\"")
        .await;
    assert!(v2 >= 8.0, "{v2}");
}

/// Tenancy applies to the protocol: the key comes from the `x-api-key`
/// header or the gRPC metadata of that name, a call without one is
/// refused, and requests count under the tenant. A gRPC message is charged
/// to the tenant's buffer share once, though it is counted as it arrives
/// and again as it is scored (a batch of two raw tensors, 1.2 MB, fits a
/// 2 MiB share only once), and every byte is released afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_calls_are_admitted_by_tenant_key_over_http_and_grpc() {
    let gw = Gateway::start_with(
        &format!(
            "[limits]\nmax_body_bytes = 2097152\n[video]\nmax_body_bytes = 2097152\n{}",
            common::tenant(
                "acme",
                "max_inflight_body_bytes = 2097152\n\
                 routes = { moderation = [{ model = \"open_nsfw\", weight = 1 }] }"
            )
        ),
        &[("MMGATE_GRPC_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let text = conformance(&gw, Some("key-acme"), false).await;
    assert!(
        text.contains("ok   HTTP infer without a key refused"),
        "{text}"
    );
    assert!(
        text.contains("ok   gRPC infer without a key refused"),
        "{text}"
    );
    assert!(text.contains("ok   gRPC alias infer"), "{text}");
    let acme = gw.metric("mmgate_requests_total", "tenant=\"acme\"").await;
    assert!(acme >= 8.0, "{acme}");
    let t = std::time::Instant::now();
    while gw.metric("mmgate_buffered_bytes", "").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "bytes still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Triton's load tool, `perf_analyzer` (from the official client's package,
/// unpacked by `setup.sh test`), runs unchanged against mmgate: the README's
/// commands over HTTP and gRPC, with tensors in the body and in system
/// shared memory, as a tenant (`-H x-api-key:…`, sent as gRPC metadata too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_runs_unchanged_against_mmgate() {
    let pa = repo().join(".deps/perf-analyzer/perf_analyzer");
    assert!(
        pa.is_file(),
        "{} is missing: run `bash scripts/setup.sh test` (or `make test`)",
        pa.display()
    );
    let gw = Gateway::start_with(
        &common::tenant("acme", ""),
        &[
            ("MMGATE_GRPC_LISTEN", "127.0.0.1:0"),
            ("MMGATE_ALLOW_CLIENT_SHM", "true"),
        ],
    )
    .await;
    let grpc = gw.grpc_addr.clone().unwrap();
    let runs = [
        ("HTTP", gw.addr.as_str(), "http", "none"),
        ("gRPC", grpc.as_str(), "grpc", "none"),
        ("HTTP shared memory", gw.addr.as_str(), "http", "system"),
        ("gRPC shared memory", grpc.as_str(), "grpc", "system"),
    ];
    let dir = std::env::temp_dir().join(format!("mmgate-perf-analyzer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sent = 0.0;
    for (what, url, protocol, shm) in runs {
        let csv = dir.join(format!("{protocol}-{shm}.csv"));
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(&pa)
                .args(["-m", "open_nsfw", "-u", url, "-i", protocol])
                .args(["-H", "x-api-key:key-acme", "--shared-memory", shm])
                .args(["--output-shared-memory-size", "64"])
                .args(["--concurrency-range", "1:4:3"])
                .args(["--measurement-mode", "count_windows"])
                .args(["--measurement-request-count", "20"])
                // The protocol is under test, not a stable figure: on a busy
                // machine the default 10% may never settle, and that fails.
                .args(["--stability-percentage", "1000"])
                .arg("-f")
                .arg(&csv)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("perf_analyzer ({what}) took over 120 s"))
        .expect("perf_analyzer runs");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "perf_analyzer ({what}) failed:\n{text}"
        );
        // No failed call, and its clean-up (unregistering all system and
        // CUDA regions) succeeded.
        let lower = text.to_lowercase();
        for bad in ["error", "unable", "failed"] {
            assert!(!lower.contains(bad), "perf_analyzer ({what}):\n{text}");
        }
        // One row per concurrency level, each with a throughput.
        let table = std::fs::read_to_string(&csv).unwrap();
        let rates: Vec<f64> = table
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(rates.len(), 2, "{what}: {table}");
        assert!(rates.iter().all(|&r| r > 0.0), "{what}: {table}");
        // Every call was a tenant's scored request.
        let now = gw
            .metric(
                "mmgate_requests_total",
                "code=\"200\",model=\"open_nsfw\",tenant=\"acme\"",
            )
            .await;
        assert!(now >= sent + 40.0, "{what}: {now} requests after {sent}");
        sent = now;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// This host's address on a non-loopback interface (the route a packet to
/// a private address would take; nothing is sent).
fn non_loopback_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("10.255.255.255:9").unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "no non-loopback interface to test from");
    ip
}

/// A region registered by a client on this host cannot be read or written
/// by a remote client's infer that names it (here with no tenants, where
/// every client is the same anonymous tenant): 403, as a remote
/// registration is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_cannot_use_a_local_clients_region() {
    let gw = Gateway::start_with(
        "",
        &[
            ("MMGATE_ALLOW_CLIENT_SHM", "true"),
            ("MMGATE_LISTEN", "0.0.0.0:0"),
        ],
    )
    .await;
    let port = gw.addr.rsplit(':').next().unwrap().to_string();
    let spec = config::ModelSpec::load(&repo().join("configs/models/open_nsfw.toml")).unwrap();
    let n = spec.input.sample_bytes();
    let key = format!("mmgate-remote-{}", std::process::id());
    let path = format!("/dev/shm/{key}");
    std::fs::write(&path, vec![0u8; n + 64]).unwrap();
    // The local client registers its region.
    let local = format!("http://127.0.0.1:{port}");
    let r = common::Reply::of(
        gw.client
            .post(format!(
                "{local}/v2/systemsharedmemory/region/mine/register"
            ))
            .json(&serde_json::json!({"key": key, "offset": 0, "byte_size": n + 64})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let shape = spec.input.batch_shape(1);
    let as_input = serde_json::json!({"inputs": [{"name": spec.input.name, "shape": shape,
        "datatype": "FP32", "parameters": {"shared_memory_region": "mine",
        "shared_memory_byte_size": n}}]});
    let as_output = serde_json::json!({"inputs": [{"name": spec.input.name, "shape": [1],
        "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "scores",
        "parameters": {"shared_memory_region": "mine", "shared_memory_byte_size": 64,
        "shared_memory_offset": n}}]});
    // Locally, the region serves as an input.
    let infer = |base: &str, body: &serde_json::Value| {
        gw.client
            .post(format!("{base}/v2/models/open_nsfw/infer"))
            .json(body)
    };
    let r = common::Reply::of(infer(&local, &as_input)).await;
    assert_eq!(r.status, 200, "{}", r.json);
    // Remotely, neither as an input nor as an output.
    let remote = format!("http://{}:{port}", non_loopback_ip());
    for body in [&as_input, &as_output] {
        let r = common::Reply::of(infer(&remote, body)).await;
        assert_eq!(r.status, 403, "{}", r.json);
        assert!(
            r.json["error"]
                .as_str()
                .unwrap()
                .starts_with("shared_memory_not_local"),
            "{}",
            r.json
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// Malformed requests: a 400 with `{"error": "…"}`, nothing crashes, and
/// the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_v2_requests_get_400_with_the_protocol_error_body() {
    let gw = Gateway::start("").await;
    let url = gw.url("/v2/models/open_nsfw/infer");
    let n = 224 * 224 * 3 * 4;
    let binary = |head: serde_json::Value, data: Vec<u8>, declared: Option<usize>| {
        let mut body = serde_json::to_vec(&head).unwrap();
        let len = declared.unwrap_or(body.len());
        body.extend(data);
        gw.client
            .post(&url)
            .header("inference-header-content-length", len.to_string())
            .body(body)
    };
    let fp32 = |size: usize| {
        serde_json::json!({"inputs": [{"name": "input:0", "shape": [1, 224, 224, 3],
            "datatype": "FP32", "parameters": {"binary_data_size": size}}]})
    };
    let mut not_image = Vec::new();
    not_image.extend_from_slice(&11u32.to_le_bytes());
    not_image.extend_from_slice(b"hello world");
    let cases = [
        (
            "wrong datatype",
            binary(
                serde_json::json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "INT64", "data": [1]}]}),
                vec![],
                None,
            ),
        ),
        (
            "wrong shape",
            binary(
                serde_json::json!({"inputs": [{"name": "input:0", "shape": [1, 3, 224, 224], "datatype": "FP32", "parameters": {"binary_data_size": n}}]}),
                vec![0; n],
                None,
            ),
        ),
        (
            "missing input",
            binary(serde_json::json!({"inputs": []}), vec![], None),
        ),
        (
            "header length beyond the body",
            binary(fp32(n), vec![0; 16], Some(100_000)),
        ),
        (
            "binary size mismatch",
            binary(fp32(n), vec![0; n - 8], None),
        ),
        (
            "a BYTES element that is not an image",
            binary(
                serde_json::json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": not_image.len()}}]}),
                not_image.clone(),
                None,
            ),
        ),
        ("not JSON", gw.client.post(&url).body("{{{")),
        // More values than the shape holds: refused without building them.
        ("FP32 JSON data longer than its shape", gw.client.post(&url).body(format!(
            "{{\"inputs\": [{{\"name\": \"input:0\", \"shape\": [1, 224, 224, 3], \"datatype\": \"FP32\", \"data\": [{}0]}}]}}",
            "0,".repeat(224 * 224 * 3)
        ))),
        ("many empty BYTES elements for shape [1]", binary(serde_json::json!({"inputs": [{"name": "input:0", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 400_000}}]}), vec![0; 400_000], None)),
    ];
    for (what, req) in cases {
        let r = common::Reply::of(req).await;
        assert_eq!(r.status, 400, "{what}: {}", r.json);
        let msg = r.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {}", r.json));
        assert!(!msg.is_empty(), "{what}");
    }
    // A body over limits.max_body_bytes (32 MiB): 413, before it is read.
    let big = gw
        .client
        .post(&url)
        .header("inference-header-content-length", "2")
        .header("content-length", (33u64 << 20).to_string())
        .body(vec![b'{'; 1024]);
    let r = common::Reply::of(big).await;
    assert_eq!(r.status, 413, "{}", r.json);
    assert!(
        r.json["error"]
            .as_str()
            .unwrap()
            .contains("payload_too_large"),
        "{}",
        r.json
    );
    // Unknown model and version: the protocol's 404.
    for path in ["/v2/models/nope", "/v2/models/open_nsfw/versions/7"] {
        let r = gw.get(path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.json);
        assert!(r.json["error"].is_string(), "{}", r.json);
    }
    // The shared-memory extension is off unless allowed.
    let r = common::Reply::of(
        gw.client
            .post(gw.url("/v2/systemsharedmemory/region/x/register"))
            .json(&serde_json::json!({"key": "/x", "offset": 0, "byte_size": 8})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]
            .as_str()
            .unwrap()
            .contains("--allow-client-shm"),
        "{}",
        r.json
    );
    // An infer for an unknown model or version: 404, the connection
    // closed, and counted like /v1's.
    for path in [
        "/v2/models/nope/infer",
        "/v2/models/open_nsfw/versions/7/infer",
    ] {
        let r = common::Reply::of(gw.client.post(gw.url(path)).body("{}")).await;
        assert_eq!(r.status, 404, "{path}: {}", r.json);
        assert!(r.json["error"].is_string(), "{}", r.json);
        assert_eq!(r.headers["connection"], "close", "{path}");
    }
    let unknown = gw
        .metric("mmgate_requests_total", "model=\"unknown\"")
        .await;
    assert!(unknown >= 1.0, "{unknown}");
    assert_eq!(gw.good_image().await.status, 200);
}
