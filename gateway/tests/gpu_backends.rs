//! GPU backends on a host without a GPU (this one, and CI): a model declared
//! `onnxruntime-cuda` or `onnxruntime-tensorrt` either serves on the CPU,
//! saying so once in the log and in `/v1/models` and `/readyz`, or refuses
//! to start with the reason, as its `[gpu] fallback` says. And uint8 slots
//! (`slot_dtype = "uint8"`), normalised by the executor, score as the float
//! slots do.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A models folder holding open_nsfw's spec with `backend` and `[gpu]`
/// replaced (paths made absolute, so the folder can live anywhere).
fn gpu_models(dir: &Path, backend: &str, gpu: &str) -> PathBuf {
    models_with(dir, &format!("backend = {backend:?}"), gpu)
}

/// open_nsfw's spec with its `backend` line replaced by `top` (top-level
/// keys) and `[gpu]` set to `gpu`.
fn models_with(dir: &Path, top: &str, gpu: &str) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let spec = std::fs::read_to_string(repo().join("configs/models/open_nsfw.toml")).unwrap();
    let abs = |rel: &str| {
        repo()
            .join("configs/models")
            .join(rel)
            .display()
            .to_string()
    };
    let spec = spec
        .replace(
            "\"../../.deps/models/open-nsfw.onnx\"",
            &format!("{:?}", abs("../../.deps/models/open-nsfw.onnx")),
        )
        .replace(
            "\"../../tests/fixtures/images\"",
            &format!("{:?}", abs("../../tests/fixtures/images")),
        )
        .replace("backend = \"openvino\"", top);
    assert!(spec.contains(top), "the spec's backend line moved");
    std::fs::write(
        models.join("open_nsfw.toml"),
        format!("{spec}\n[gpu]\n{gpu}\n"),
    )
    .unwrap();
    models
}

/// Whether `text` names why a GPU backend cannot run on a host like this
/// one: no driver (here and in CI), or, on a host with a driver, the CPU
/// ONNX Runtime library without the provider.
fn names_the_reason(text: &str) -> bool {
    text.contains("libcuda.so.1") || text.contains("was built without the")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmgate-gpu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ctype(name: &str) -> &'static str {
    if name.ends_with(".png") {
        "image/png"
    } else if name.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "application/octet-stream"
    }
}

/// Falls back with one log line naming the missing driver, reports the CPU
/// backend, and scores every reference fixture correctly.
async fn falls_back_to_cpu(backend: &str) {
    let dir = temp_dir(backend);
    let models = gpu_models(&dir, backend, "fallback = \"cpu\"\ndevice = 0");
    let gw = Gateway::start_logged(&format!("[server]\nmodels_dir = {models:?}\n")).await;

    let m = gw.get("/v1/models/open_nsfw").await;
    let runtime = &m.json["runtime"];
    assert_eq!(m.json["backend"], backend, "the spec's request: {}", m.json);
    assert_eq!(runtime["backend"], "onnxruntime-cpu", "{}", m.json);
    assert_eq!(runtime["precision"], "f32", "{}", m.json);
    assert!(runtime["gpu"].is_null(), "{}", m.json);
    let fallbacks = runtime["fallbacks"].as_array().unwrap();
    assert_eq!(fallbacks.len(), 1, "{}", m.json);
    let line = fallbacks[0].as_str().unwrap();
    assert!(
        line.contains(&format!("{backend} cannot run"))
            && names_the_reason(line)
            && line.contains("onnxruntime-cpu runs instead"),
        "{line}"
    );
    let ready = gw.get("/readyz").await;
    assert_eq!(
        ready.json["models"][0]["backend"], "onnxruntime-cpu",
        "{}",
        ready.json
    );

    // Correct scores on the CPU it fell back to.
    let expected = expected();
    for (name, want) in expected["images"].as_object().unwrap() {
        let r = gw
            .score("open_nsfw", fixture(&format!("images/{name}")), ctype(name))
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.json);
        let want = want["nsfw"].as_f64().unwrap();
        assert!(
            close_enough(want, r.nsfw()),
            "{name}: want {want}, got {}",
            r.nsfw()
        );
    }

    // The reason is logged once, by the executor, as a warning.
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&format!("{backend} cannot run")))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(names_the_reason(lines[0]), "{}", lines[0]);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cuda_model_without_a_gpu_serves_on_cpu_and_says_so() {
    falls_back_to_cpu("onnxruntime-cuda").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensorrt_model_without_a_gpu_serves_on_cpu_and_says_so() {
    falls_back_to_cpu("onnxruntime-tensorrt").await;
}

#[test]
fn a_gpu_model_that_must_not_fall_back_stops_the_gateway_within_5_s() {
    deps_check();
    let _machine = exclusive();
    let dir = temp_dir("fail");
    let models = gpu_models(&dir, "onnxruntime-cuda", "fallback = \"fail\"");
    let cfg = write_config(&dir, &format!("[server]\nmodels_dir = {models:?}\n"));
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mmgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("MMGATE_ADMIN_LISTEN", "")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("still running after 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    println!("exited {status:?} after {took:?}");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("backend onnxruntime-cuda cannot run")
            && names_the_reason(&err)
            && err.contains("gpu.fallback is \"fail\""),
        "{err}"
    );
}

/// Every reference photo, one at a time: its nsfw score.
async fn scores(gw: &Gateway) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (name, _) in expected()["images"].as_object().unwrap() {
        let r = gw
            .score("open_nsfw", fixture(&format!("images/{name}")), ctype(name))
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.json);
        out.push((name.clone(), r.nsfw()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uint8_slots_score_as_float_slots_and_refuse_raw_tensors() {
    let dir = temp_dir("uint8");
    let cpu = "backend = \"onnxruntime-cpu\"";
    let float_dir = dir.join("float");
    let float_models = models_with(&float_dir, cpu, "");
    let uint8_models = models_with(&dir, &format!("{cpu}\nslot_dtype = \"uint8\""), "");
    let float = {
        let gw = Gateway::start(&format!("[server]\nmodels_dir = {float_models:?}\n")).await;
        scores(&gw).await
    };
    let gw = Gateway::start(&format!("[server]\nmodels_dir = {uint8_models:?}\n")).await;
    let m = gw.get("/v1/models/open_nsfw").await;
    assert_eq!(
        m.json["runtime"]["backend"], "onnxruntime-cpu",
        "{}",
        m.json
    );
    let uint8 = scores(&gw).await;
    let expected = expected();
    for ((name, f), (_, u)) in float.iter().zip(&uint8) {
        println!("{name}: float {f:.7} uint8 {u:.7}");
        // The same input tensor (normalised in the executor instead of the
        // worker, bit for bit), the same batch of one: the same score.
        assert!((f - u).abs() <= 1e-6, "{name}: float {f}, uint8 {u}");
        let want = expected["images"][name]["nsfw"].as_f64().unwrap();
        assert!(
            close_enough(want, *u),
            "{name}: reference {want}, uint8 {u}"
        );
    }
    // A batch of several is normalised in the executor too.
    let photos: Vec<_> = float.iter().take(4).map(|(n, _)| n.clone()).collect();
    let answers = futures::future::join_all(
        photos
            .iter()
            .map(|n| gw.score("open_nsfw", fixture(&format!("images/{n}")), ctype(n))),
    )
    .await;
    for (n, r) in photos.iter().zip(&answers) {
        assert_eq!(r.status, 200, "{n}: {}", r.json);
        let want = expected["images"][n]["nsfw"].as_f64().unwrap();
        assert!(
            close_enough(want, r.nsfw()),
            "{n}: reference {want}, got {}",
            r.nsfw()
        );
    }
    // The v2 metadata says so: encoded images, not an FP32 tensor.
    let meta = gw.get("/v2/models/open_nsfw").await;
    assert_eq!(meta.json["inputs"][0]["datatype"], "BYTES", "{}", meta.json);
    // Raw FP32 tensors cannot go into pixel slots: 400 with the reason.
    let body = serde_json::json!({"inputs": [{"name": "input:0", "shape": [1, 224, 224, 3],
        "datatype": "FP32", "data": vec![0.0f32; 224 * 224 * 3]}]});
    let r = Reply::of(
        gw.client
            .post(gw.url("/v2/models/open_nsfw/infer"))
            .json(&body),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"].as_str().unwrap().contains("slot_dtype"),
        "{}",
        r.json
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped GPU example's model (CUDA, uint8 slots, fallback to CPU)
/// starts here and scores correctly, and its server file parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_example_serves_here_on_its_cpu_fallback() {
    let example = repo().join("configs/examples/gpu.toml");
    config::ServerConfig::load(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let models = repo().join("configs/examples/gpu-models");
    let gw = Gateway::start(&format!("[server]\nmodels_dir = {models:?}\n")).await;
    let m = gw.get("/v1/models/open_nsfw").await;
    assert_eq!(m.json["backend"], "onnxruntime-cuda", "{}", m.json);
    assert_eq!(
        m.json["runtime"]["backend"], "onnxruntime-cpu",
        "{}",
        m.json
    );
    let want = expected()["images"]["coffee.jpg"]["nsfw"].as_f64().unwrap();
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        close_enough(want, r.nsfw()),
        "want {want}, got {}",
        r.nsfw()
    );
}
