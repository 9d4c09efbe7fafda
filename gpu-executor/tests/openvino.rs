//! The OpenVINO CPU engine on the real open_nsfw model and the real
//! library: scores against ONNX Runtime, batching, the latency lane, and
//! the start-up precision check with its two outcomes.

mod common;

use config::{
    Backend, OnPrecisionError, Precision, PrecisionCheck, PrecisionRequest, ThroughputPriority,
};
use gpu_executor::calibration::{self, max_delta};
use gpu_executor::openvino_cpu::{self, StreamLayout};
use gpu_executor::{Engine, ExecError, load, load_model};

fn ov(spec: &config::ModelSpec, precision: Precision) -> openvino_cpu::Loaded {
    openvino_cpu::library(&common::openvino_library()).unwrap();
    openvino_cpu::load(
        spec,
        precision,
        StreamLayout::of(spec, ThroughputPriority::Normal),
        None,
    )
    .unwrap()
}

fn cpu_has_bf16() -> bool {
    openvino_cpu::library(&common::openvino_library()).unwrap();
    openvino_cpu::core().unwrap().1.bf16()
}

/// Log-odds difference of every sample between two engines.
fn worst(a: &mut dyn Engine, b: &mut dyn Engine, samples: &[Vec<f32>]) -> f64 {
    samples
        .iter()
        .map(|s| max_delta(&a.run(s, 1).unwrap(), &b.run(s, 1).unwrap()))
        .fold(0.0, f64::max)
}

#[test]
fn f32_matches_onnx_runtime_and_bf16_stays_within_the_tolerance() {
    let spec = common::open_nsfw();
    let samples: Vec<Vec<f32>> = (0..4).map(|k| common::sample(&spec, k)).collect();
    let mut ort = load(&spec, &common::backends()).unwrap();
    let mut f32 = ov(&spec, Precision::F32);
    assert_eq!(f32.precision, Precision::F32);
    let d = worst(ort.as_mut(), f32.engines[0].as_mut(), &samples);
    assert!(d < 1e-3, "OpenVINO f32 is {d} log-odds from ONNX Runtime");
    if cpu_has_bf16() {
        let mut bf16 = ov(&spec, Precision::Bf16);
        assert_eq!(bf16.precision, Precision::Bf16, "compiled precision");
        let d = worst(ort.as_mut(), bf16.engines[0].as_mut(), &samples);
        // Different, or bf16 did not run; close, or it is unusable.
        assert!(d > 1e-5 && d < 0.3, "bf16 is {d} log-odds from f32");
    }
}

#[test]
fn batches_and_both_lanes_give_the_single_run_scores() {
    let spec = common::open_nsfw();
    let mut loaded = ov(&spec, Precision::F32);
    let lanes: Vec<bool> = loaded.engines.iter().map(|e| e.latency_lane()).collect();
    assert_eq!(
        lanes,
        [false, false, true],
        "one engine per instance, then the latency lane"
    );
    let samples: Vec<Vec<f32>> = (0..4).map(|k| common::sample(&spec, k)).collect();
    let lane = &mut loaded.engines[2];
    let alone: Vec<Vec<f32>> = samples.iter().map(|s| lane.run(s, 1).unwrap()).collect();
    let e = &mut loaded.engines[0];
    let own: Vec<Vec<f32>> = samples.iter().map(|s| e.run(s, 1).unwrap()).collect();
    let batch = e.run(&samples.concat(), 4).unwrap();
    for k in 0..4 {
        assert!(max_delta(&alone[k], &own[k]) < 1e-3, "{alone:?} vs {own:?}");
        assert!(
            max_delta(&batch[2 * k..2 * k + 2], &own[k]) < 1e-3,
            "{batch:?}"
        );
    }
    assert!(max_delta(&own[0], &own[1]) > 1e-4, "samples must differ");
    // Out-of-range batches are refused, not run.
    assert!(matches!(
        e.run(&samples.concat(), 5),
        Err(ExecError::BatchTooLarge { .. })
    ));
    assert!(matches!(
        e.run(&samples[0][1..], 1),
        Err(ExecError::InputSize { .. })
    ));
}

fn with_check(limit: f64, on_error: OnPrecisionError) -> config::ModelSpec {
    let mut spec = common::open_nsfw();
    spec.instances.count = 1;
    spec.openvino.precision = PrecisionRequest::Auto;
    spec.precision = Some(PrecisionCheck {
        max_logodds_error: limit,
        calibration_images: common::root()
            .join("tests/fixtures/images")
            .display()
            .to_string(),
        on_error,
    });
    spec
}

#[test]
fn a_precision_within_the_limit_serves_and_reports_its_check() {
    let loaded = load_model(
        &with_check(0.3, OnPrecisionError::Refuse),
        &common::backends(),
        1,
    )
    .unwrap();
    let r = &loaded.runtime;
    assert_eq!(r.backend, Backend::Openvino);
    if !cpu_has_bf16() {
        assert_eq!(r.precision, Precision::F32);
        assert!(r.fallbacks[0].contains("no native BF16"), "{r:?}");
        return;
    }
    assert_eq!(r.precision, Precision::Bf16, "{r:?}");
    let c = r.calibration.as_ref().expect("bf16 is checked");
    assert!(c.passed && c.images == 13, "{c:?}");
    assert!(
        c.max_logodds_error > 0.0 && c.max_logodds_error < 0.3,
        "{c:?}"
    );
    assert!(r.fallbacks.is_empty(), "{r:?}");
}

#[test]
fn a_precision_over_the_limit_falls_back_to_f32_or_refuses_as_configured() {
    if !cpu_has_bf16() {
        eprintln!("skipped: this CPU has no native BF16, so nothing is checked");
        return;
    }
    // No bf16 run is within 1e-9 of f32.
    let loaded = load_model(
        &with_check(1e-9, OnPrecisionError::F32),
        &common::backends(),
        1,
    )
    .unwrap();
    let r = &loaded.runtime;
    assert_eq!(r.precision, Precision::F32, "{r:?}");
    let c = r.calibration.as_ref().unwrap();
    assert!(!c.passed && c.precision == Precision::Bf16, "{c:?}");
    assert!(r.fallbacks[0].contains("so f32 runs"), "{r:?}");

    let err = load_model(
        &with_check(1e-9, OnPrecisionError::Refuse),
        &common::backends(),
        1,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ExecError::PrecisionCheck { .. }) && msg.contains("refuse"),
        "{msg}"
    );
}

#[test]
fn an_explicit_bf16_on_a_cpu_without_it_is_refused_and_auto_runs_f32() {
    let no_bf16 = openvino_cpu::CpuInfo {
        name: "Old CPU".into(),
        capabilities: vec!["FP32".into(), "INT8".into()],
    };
    let err = openvino_cpu::choose_precision(PrecisionRequest::Bf16, &no_bf16).unwrap_err();
    assert!(err.contains("Old CPU") && err.contains("auto"), "{err}");
    let (p, note) = openvino_cpu::choose_precision(PrecisionRequest::Auto, &no_bf16).unwrap();
    assert_eq!(p, Precision::F32);
    assert!(note.unwrap().contains("no native BF16"));
    let bf16 = openvino_cpu::CpuInfo {
        name: "New CPU".into(),
        capabilities: vec!["BF16".into(), "FP32".into()],
    };
    assert_eq!(
        openvino_cpu::choose_precision(PrecisionRequest::Auto, &bf16).unwrap(),
        (Precision::Bf16, None)
    );
    assert_eq!(
        openvino_cpu::choose_precision(PrecisionRequest::F32, &bf16).unwrap(),
        (Precision::F32, None)
    );
}

#[test]
fn calibration_refuses_a_folder_without_images() {
    let spec = common::open_nsfw();
    let empty = std::env::temp_dir().join(format!("mmgate-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let files = calibration::image_files(&empty).unwrap();
    let err = calibration::samples(&spec, &files).unwrap_err().to_string();
    assert!(err.contains("no calibration images"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
}
