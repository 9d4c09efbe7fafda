//! `check-model`: scores images on every backend and precision this machine
//! has, and prints per image the difference in log-odds against the
//! reference (ONNX Runtime f32, the engine the model was published with),
//! the worst difference of each, and each one's throughput. This is how an
//! operator decides whether a reduced precision may serve a model.
//!
//! `mmgate check-model --config FILE --model M IMAGES…` runs it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use config::{Backend, ModelSpec, Precision, ServerConfig};

use crate::calibration::{self, Sample};
use crate::openvino_cpu::{self, StreamLayout};
use crate::{Backends, Engine, ExecError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server config (TOML); model specs are read from its `models_dir`.
    #[arg(long, default_value = "configs/default.toml")]
    pub config: PathBuf,
    /// Model name (as in `/v1/models`).
    #[arg(long)]
    pub model: String,
    /// Seconds of throughput measurement per engine and batch size.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Image files or folders of images.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// One engine configuration to compare.
struct Variant {
    backend: Backend,
    precision: Precision,
    engine: Result<Box<dyn Engine>, String>,
}

impl Variant {
    fn name(&self) -> String {
        format!("{} {}", self.backend.as_str(), self.precision.as_str())
    }
}

/// Runs the check and prints the report; the exit is an error only when
/// nothing could be measured.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = ServerConfig::load(&args.config)?;
    let spec = cfg
        .models
        .iter()
        .find(|m| m.name == args.model)
        .ok_or_else(|| {
            let names: Vec<&str> = cfg.models.iter().map(|m| m.name.as_str()).collect();
            anyhow::anyhow!(
                "no model {:?} in {}; it has {names:?}",
                args.model,
                args.config.display()
            )
        })?;
    let files = expand(&args.images)?;
    let samples = calibration::samples(spec, &files)?;
    let backends = Backends::from_section(&cfg.executor);
    let mut variants = variants(spec, &backends);
    let Some(reference) = variants.iter().position(|v| v.engine.is_ok()) else {
        for v in &variants {
            eprintln!(
                "{}: {}",
                v.name(),
                v.engine.as_ref().err().map_or("", |e| e)
            );
        }
        anyhow::bail!("no backend could load model {}", spec.name);
    };
    println!(
        "model {} ({}), {} images, reference {}, CPU {}",
        spec.name,
        spec.file,
        samples.len(),
        variants[reference].name(),
        crate::cpu_name()
    );
    let scores: Vec<Option<Vec<Vec<f32>>>> = variants
        .iter_mut()
        .map(|v| {
            v.engine
                .as_mut()
                .ok()
                .map(|e| score_all(spec, e.as_mut(), &samples))
        })
        .map(|s| s.transpose())
        .collect::<Result<_, ExecError>>()?;
    let reference_scores = scores[reference].clone().expect("the reference loaded");
    print_images(spec, &variants, &samples, &scores, &reference_scores);
    println!();
    print_summary(
        spec,
        &mut variants,
        &samples,
        &scores,
        &reference_scores,
        args.seconds,
    )?;
    Ok(())
}

/// Files as given, folders as their image files.
fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(calibration::image_files(p)?);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// ONNX Runtime f32, then OpenVINO f32 and bf16 (where the CPU has BF16),
/// each as one instance using every core.
fn variants(spec: &ModelSpec, backends: &Backends) -> Vec<Variant> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut ort_spec = spec.clone();
    ort_spec.instances.count = 1;
    ort_spec.instances.intra_threads = cores as u32;
    let mut out = vec![Variant {
        backend: Backend::OnnxruntimeCpu,
        precision: Precision::F32,
        engine: crate::load(&ort_spec, backends).map_err(|e| e.to_string()),
    }];
    let layout = StreamLayout {
        requests: 1,
        streams: 1,
        threads: cores,
        lane_threads: None,
        throughput_priority: config::ThroughputPriority::Normal,
    };
    let ov = openvino_cpu::library(backends.openvino_library())
        .and_then(|()| openvino_cpu::core())
        .map(|(_, cpu)| cpu);
    for precision in [Precision::F32, Precision::Bf16] {
        let engine = match &ov {
            Err(e) => Err(e.to_string()),
            Ok(cpu) if precision == Precision::Bf16 && !cpu.bf16() => Err(format!(
                "the CPU ({}) has no native BF16 (neither AMX nor AVX-512 BF16)",
                cpu.name
            )),
            Ok(_) => openvino_cpu::load(spec, precision, layout, None)
                .map_err(|e| e.to_string())
                .and_then(|l| {
                    if l.precision == precision {
                        Ok(l.engines.into_iter().next().expect("one request"))
                    } else {
                        Err(format!("compiled in {} instead", l.precision.as_str()))
                    }
                }),
        };
        out.push(Variant {
            backend: Backend::Openvino,
            precision,
            engine,
        });
    }
    out
}

fn score_all(
    spec: &ModelSpec,
    engine: &mut dyn Engine,
    samples: &[Sample],
) -> Result<Vec<Vec<f32>>, ExecError> {
    samples
        .iter()
        .map(|s| calibration::score(spec, engine, s))
        .collect()
}

/// The label whose log-odds the table shows: the last (e.g. `nsfw`).
fn shown_label(spec: &ModelSpec) -> usize {
    spec.output.labels.len() - 1
}

fn print_images(
    spec: &ModelSpec,
    variants: &[Variant],
    samples: &[Sample],
    scores: &[Option<Vec<Vec<f32>>>],
    reference: &[Vec<f32>],
) {
    let label = shown_label(spec);
    print!(
        "{:<28} {:>10}",
        "image",
        format!("{} p", spec.output.labels[label])
    );
    for v in variants.iter().filter(|v| v.engine.is_ok()) {
        print!(" {:>22}", format!("Δlogodds {}", v.name()));
    }
    println!();
    for (i, s) in samples.iter().enumerate() {
        print!(
            "{:<28} {:>10.5}",
            truncate(&s.name, 28),
            reference[i][label]
        );
        for sc in scores.iter().flatten() {
            print!(" {:>22.5}", calibration::max_delta(&sc[i], &reference[i]));
        }
        println!();
    }
}

fn print_summary(
    spec: &ModelSpec,
    variants: &mut [Variant],
    samples: &[Sample],
    scores: &[Option<Vec<Vec<f32>>>],
    reference: &[Vec<f32>],
    seconds: f64,
) -> Result<(), ExecError> {
    let max_batch = spec.batching.max_batch.max(1) as usize;
    let limit = spec.precision.as_ref().map(|p| p.max_logodds_error);
    println!(
        "{:<22} {:>16} {:<24} {:>12} {:>14}  verdict",
        "engine",
        "max Δlogodds",
        "worst image",
        "img/s b=1",
        format!("img/s b={max_batch}")
    );
    for (v, sc) in variants.iter_mut().zip(scores) {
        let name = v.name();
        let (Ok(engine), Some(sc)) = (v.engine.as_mut(), sc) else {
            println!(
                "{name:<22} unavailable: {}",
                v.engine.as_ref().err().map_or("", |e| e)
            );
            continue;
        };
        let (worst, image) = sc
            .iter()
            .zip(reference)
            .zip(samples)
            .map(|((a, b), s)| (calibration::max_delta(a, b), s.name.as_str()))
            .fold((0.0, ""), |acc, x| if x.0 > acc.0 { x } else { acc });
        let b1 = throughput(engine.as_mut(), samples, 1, seconds)?;
        let bn = throughput(engine.as_mut(), samples, max_batch, seconds)?;
        let verdict = match limit {
            Some(l) if worst <= l => format!("within precision.max_logodds_error {l}"),
            Some(l) => format!("OVER precision.max_logodds_error {l}"),
            None => String::new(),
        };
        println!(
            "{name:<22} {worst:>16.5} {:<24} {b1:>12.1} {bn:>14.1}  {verdict}",
            truncate(image, 24)
        );
    }
    Ok(())
}

/// Images per second over `seconds` of batches of `batch` samples.
fn throughput(
    engine: &mut dyn Engine,
    samples: &[Sample],
    batch: usize,
    seconds: f64,
) -> Result<f64, ExecError> {
    let input: Vec<f32> = samples
        .iter()
        .cycle()
        .take(batch)
        .flat_map(|s| s.tensor.iter().copied())
        .collect();
    engine.run(&input, batch)?;
    let (start, mut done) = (Instant::now(), 0usize);
    while start.elapsed() < Duration::from_secs_f64(seconds) || done == 0 {
        engine.run(&input, batch)?;
        done += batch;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}
