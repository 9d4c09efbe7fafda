//! Start-up of an OpenVINO model that never lies: choose the precision from
//! what the CPU really offers, compile, read back the precision the compiled
//! model runs in, and, when the spec has `[precision]`, prove a reduced
//! precision against f32 on the calibration images before it serves.

use std::path::Path;

use config::{Backend, ModelSpec, OnPrecisionError, Precision, PrecisionCheck};
use shm::{Calibration, ModelRuntime};

use crate::openvino_cpu::{self, StreamLayout};
use crate::{Backends, ExecError, LoadedModel, calibration};

/// Loads `spec` on OpenVINO (the library is loaded). Lines saying where the
/// runtime differs from the spec's request go to `fallbacks` (and the log).
pub(crate) fn instances(
    spec: &ModelSpec,
    backends: &Backends,
    fallbacks: &mut Vec<String>,
) -> Result<LoadedModel, ExecError> {
    let model = spec.name.as_str();
    let (_, cpu) = openvino_cpu::core()?;
    let (precision, note) =
        openvino_cpu::choose_precision(spec.openvino.precision, &cpu).map_err(|message| {
            ExecError::Precision {
                model: model.into(),
                message,
            }
        })?;
    if let Some(line) = note {
        tracing::warn!(model, "{line}");
        fallbacks.push(line);
    }
    let layout = StreamLayout::of(spec, backends.throughput_priority());
    let cache = if spec.openvino.cache {
        backends.cache_for(spec, Backend::Openvino)
    } else {
        None
    };
    let cache = cache.as_deref();
    let mut loaded = openvino_cpu::load(spec, precision, layout, cache)?;
    if loaded.precision != precision {
        let line = format!(
            "asked OpenVINO for {}, but the compiled model runs in {}",
            precision.as_str(),
            loaded.precision.as_str()
        );
        tracing::warn!(model, "{line}");
        fallbacks.push(line);
    }
    let mut calibration = None;
    if let Some(check) = &spec.precision
        && loaded.precision != Precision::F32
    {
        let result = check_precision(spec, check, &mut loaded, layout, cache)?;
        if !result.passed {
            let line = format!(
                "{} is off by {:.4} in log-odds on the calibration images (precision.max_logodds_error {}), so f32 runs",
                result.precision.as_str(),
                result.max_logodds_error,
                result.limit
            );
            tracing::warn!(model, "{line}");
            fallbacks.push(line);
            loaded = openvino_cpu::load(spec, Precision::F32, layout, cache)?;
        }
        calibration = Some(result);
    }
    Ok(LoadedModel {
        device: None,
        runtime: ModelRuntime {
            model: model.into(),
            backend: Backend::Openvino,
            precision: loaded.precision,
            device: cpu.name,
            layout: loaded.layout.describe(),
            fallbacks: Vec::new(),
            calibration,
            gpu: None,
        },
        engines: loaded.engines,
    })
}

/// Scores the calibration images on `loaded` and on an f32 compilation of
/// the same model; refuses (an error) when over the limit and the spec says
/// so, else reports whether it passed.
fn check_precision(
    spec: &ModelSpec,
    check: &PrecisionCheck,
    loaded: &mut openvino_cpu::Loaded,
    layout: StreamLayout,
    cache: Option<&Path>,
) -> Result<Calibration, ExecError> {
    let files = calibration::image_files(Path::new(&check.calibration_images)).map_err(|e| {
        ExecError::Calibration {
            model: spec.name.clone(),
            message: format!(
                "precision.calibration_images {}: {e}",
                check.calibration_images
            ),
        }
    })?;
    let samples = calibration::samples(spec, &files)?;
    let one = StreamLayout {
        requests: 1,
        streams: 1,
        threads: layout.threads,
        lane_threads: None,
        throughput_priority: config::ThroughputPriority::Normal,
    };
    let mut reference = openvino_cpu::load(spec, Precision::F32, one, cache)?;
    let cmp = calibration::compare(
        spec,
        &samples,
        reference.engines[0].as_mut(),
        loaded.engines[0].as_mut(),
    )?;
    let (error, image) = cmp.worst();
    let passed = error <= check.max_logodds_error;
    tracing::info!(
        model = %spec.name,
        precision = loaded.precision.as_str(),
        images = samples.len(),
        max_logodds_error = error,
        worst = image,
        limit = check.max_logodds_error,
        passed,
        "precision check"
    );
    if !passed && check.on_error == OnPrecisionError::Refuse {
        return Err(ExecError::PrecisionCheck {
            model: spec.name.clone(),
            precision: loaded.precision.as_str(),
            error,
            limit: check.max_logodds_error,
            image: image.to_string(),
        });
    }
    Ok(Calibration {
        precision: loaded.precision,
        images: samples.len() as u32,
        max_logodds_error: error,
        limit: check.max_logodds_error,
        passed,
    })
}
