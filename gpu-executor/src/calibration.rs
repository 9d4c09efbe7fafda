//! Precision you can trust: scores calibration images through two engines
//! (a reduced precision against f32) and measures the difference in
//! log-odds, the scale on which a moderation threshold lives. Used by the
//! start-up check of a model's `[precision]` and by `check-model`.
//!
//! The images are the model's own calibration set, named by its spec (trusted
//! files, not uploads), decoded with the preprocess worker's code so that
//! they become exactly the tensors the worker would write.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use config::{Limits, ModelSpec};

use crate::{Engine, ExecError, postprocess};

/// One preprocessed image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub tensor: Vec<f32>,
}

/// The image files of `dir` (sorted by name; hidden files and subfolders
/// skipped).
pub fn image_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Decodes and preprocesses each file into `spec`'s input tensor.
pub fn samples(spec: &ModelSpec, files: &[PathBuf]) -> Result<Vec<Sample>, ExecError> {
    let err = |message: String| ExecError::Calibration {
        model: spec.name.clone(),
        message,
    };
    if files.is_empty() {
        return Err(err("no calibration images".into()));
    }
    let limits = Limits::default();
    files
        .iter()
        .map(|f| {
            let data = std::fs::read(f).map_err(|e| err(format!("{}: {e}", f.display())))?;
            let mut tensor = vec![0f32; spec.input.elements()];
            let deadline = Instant::now() + Duration::from_secs(30);
            preprocess_worker::preprocess(&data, spec, &limits, deadline, &mut tensor)
                .map_err(|e| err(format!("{}: {e}", f.display())))?;
            let name = f.file_name().map_or_else(
                || f.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok(Sample { name, tensor })
        })
        .collect()
}

/// Scores (after the spec's postprocessing) of one sample.
pub fn score(
    spec: &ModelSpec,
    engine: &mut dyn Engine,
    sample: &Sample,
) -> Result<Vec<f32>, ExecError> {
    let mut out = engine.run(&sample.tensor, 1)?;
    postprocess::apply(spec.output.postprocess, &mut out);
    Ok(out)
}

/// `ln(p / (1 - p))`, with `p` kept off 0 and 1 so a saturated score stays
/// finite (NaN stays NaN).
pub fn logodds(p: f32) -> f64 {
    let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

/// Largest |Δ log-odds| over the labels of two score vectors; infinite when
/// a score is not a finite number (a broken engine never passes a check).
pub fn max_delta(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (logodds(x) - logodds(y)).abs())
        .fold(0.0, f64::max)
}

/// One image's scores on the reference and the candidate.
#[derive(Debug, Clone)]
pub struct Row {
    pub image: String,
    pub reference: Vec<f32>,
    pub candidate: Vec<f32>,
    pub delta: f64,
}

/// The candidate against the reference on every sample.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The worst row's |Δ log-odds| and image (0 and "" with no rows).
    pub fn worst(&self) -> (f64, &str) {
        self.rows
            .iter()
            .max_by(|a, b| a.delta.total_cmp(&b.delta))
            .map_or((0.0, ""), |r| (r.delta, r.image.as_str()))
    }
}

/// Scores every sample on both engines.
pub fn compare(
    spec: &ModelSpec,
    samples: &[Sample],
    reference: &mut dyn Engine,
    candidate: &mut dyn Engine,
) -> Result<Comparison, ExecError> {
    let rows = samples
        .iter()
        .map(|s| {
            let r = score(spec, reference, s)?;
            let c = score(spec, candidate, s)?;
            Ok(Row {
                image: s.name.clone(),
                delta: max_delta(&r, &c),
                reference: r,
                candidate: c,
            })
        })
        .collect::<Result<_, ExecError>>()?;
    Ok(Comparison { rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logodds_is_symmetric_and_finite_at_the_ends() {
        assert!((logodds(0.5)).abs() < 1e-12);
        assert!((logodds(0.9) + logodds(0.1)).abs() < 1e-6);
        assert!(logodds(0.0).is_finite() && logodds(1.0).is_finite());
        assert!(logodds(1.0) > 15.0);
    }

    #[test]
    fn max_delta_takes_the_worst_label() {
        let a = [0.5, 0.5];
        let b = [0.6, 0.4];
        let d = max_delta(&a, &b);
        assert!((d - (0.6f64 / 0.4).ln()).abs() < 1e-6, "{d}");
        assert_eq!(max_delta(&a, &a), 0.0);
        assert_eq!(max_delta(&a, &[f32::NAN, 0.5]), f64::INFINITY);
        assert_eq!(max_delta(&a, &[0.5]), f64::INFINITY);
    }
}
