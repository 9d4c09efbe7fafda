//! Runs `preprocess` on one image and writes the tensor as raw little-endian
//! f32, for comparison with the Python reference (scripts/compare_preprocess.py).
//!
//!     cargo run --release -p preprocess-worker --example dump_tensor -- \
//!         IMAGE OUT.f32 [--model configs/models/open_nsfw.toml] [--no-dct] [--bench N]
//!
//! `--bench N` also times N runs and prints the median in microseconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use config::{Limits, ModelSpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut pos, mut model_path, mut dct, mut bench) = (Vec::new(), None, true, 0usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model_path = args.next(),
            "--no-dct" => dct = false,
            "--bench" => bench = args.next().context("--bench N")?.parse()?,
            _ => pos.push(a),
        }
    }
    let [image, out] = &pos[..] else {
        bail!("usage: dump_tensor IMAGE OUT.f32 [--model SPEC] [--no-dct] [--bench N]");
    };
    let model_path = model_path.map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/open_nsfw.toml")
    });
    let mut model = ModelSpec::load(&model_path)?;
    model.preprocess.jpeg_dct_scaling &= dct;
    let data = std::fs::read(image).with_context(|| format!("reading {image}"))?;
    let limits = Limits::default();
    let mut tensor = vec![0f32; model.input.elements()];
    let deadline = || Instant::now() + Duration::from_secs(60);
    let info = spec_run(&data, &model, &limits, deadline(), &mut tensor)?;
    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    println!("{}x{} {}", info.width, info.height, info.format);
    if bench > 0 {
        let mut times: Vec<Duration> = (0..bench)
            .map(|_| {
                let t = Instant::now();
                let _ = spec_run(&data, &model, &limits, deadline(), &mut tensor);
                t.elapsed()
            })
            .collect();
        times.sort();
        println!("median_us {}", times[bench / 2].as_micros());
    }
    Ok(())
}

fn spec_run(
    data: &[u8],
    model: &ModelSpec,
    limits: &Limits,
    deadline: Instant,
    out: &mut [f32],
) -> anyhow::Result<preprocess_worker::ImageInfo> {
    Ok(preprocess_worker::preprocess(
        data, model, limits, deadline, out,
    )?)
}
