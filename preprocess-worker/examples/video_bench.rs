//! Times the worker's video path on one file, in process and on one thread:
//! `cargo run -p preprocess-worker --release --example video_bench -- CLIP [FPS]`.
//! The file goes through a real input region and tensor pool, and each frame's
//! slot is granted back at once, so the number is decode + convert + resize.
//! With `DUMP=file`, every sampled tensor is appended to `file` (f32, native
//! endian) to compare decoder settings.

use std::sync::Arc;
use std::time::Instant;

use config::{Limits, ModelSpec};
use preprocess_worker::video::{self, Control, VideoEnv};
use shm::{
    FromWorker, Input, InputRegion, PoolLayout, SampleMode, Sampling, SharedTensors, SlotRef,
    VideoJob,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: video_bench CLIP [FPS] [THREADS]");
    let fps: f64 = args.next().map_or(1.0, |a| a.parse().expect("FPS"));
    let threads: u32 = args.next().map_or(1, |a| a.parse().expect("THREADS"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = ModelSpec::load(&root.join("configs/models/open_nsfw.toml")).unwrap();
    let data = std::fs::read(&path).unwrap();
    let tensors = Arc::new(
        SharedTensors::create(PoolLayout::new(&[(2, model.input.sample_bytes())])).unwrap(),
    );
    let inputs = InputRegion::create(1, data.len()).unwrap();
    inputs.write(0, &data).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let generation = std::sync::atomic::AtomicU64::new(10);
    let dump =
        std::env::var_os("DUMP").map(|p| std::sync::Mutex::new(std::fs::File::create(p).unwrap()));
    let send = |m: &FromWorker| {
        if let FromWorker::Frame(f) = m {
            if let Some(file) = &dump {
                let bytes: Vec<u8> = tensors
                    .read_f32(f.slot, |t| t.iter().flat_map(|v| v.to_ne_bytes()).collect())
                    .unwrap();
                std::io::Write::write_all(&mut *file.lock().unwrap(), &bytes).unwrap();
            }
            let g = generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let slot = SlotRef {
                generation: g,
                ..f.slot
            };
            tensors.stamp(slot).unwrap();
            tx.send(Control::Grant(slot)).unwrap();
        }
    };
    let slots: Vec<SlotRef> = (0..2)
        .map(|s| {
            let r = SlotRef {
                model: 0,
                slot: s,
                generation: u64::from(s) + 1,
            };
            tensors.stamp(r).unwrap();
            r
        })
        .collect();
    let job = VideoJob {
        job_id: 1,
        ctx: shm::RequestContext {
            request_id: "bench".into(),
            ..Default::default()
        },
        model: 0,
        input: Input::Shared {
            index: 0,
            len: data.len(),
        },
        sampling: Sampling {
            mode: SampleMode::Fps(fps),
            keyframes_only: false,
            start: 0.0,
            end: None,
            max_frames: 100_000,
            max_decoded: 10_000_000,
            max_decoded_pixels: u64::MAX,
            max_duration: 1e9,
            deadline_ms: 3_600_000,
            decode_threads: threads,
        },
        slots,
    };
    let env = VideoEnv {
        tensors: &tensors,
        model: &model,
        limits: &Limits::default(),
        send: &send,
        control: rx,
    };
    let t = Instant::now();
    let last = video::run(&env, &inputs, &job);
    let secs = t.elapsed().as_secs_f64();
    match last {
        FromWorker::VideoDone(d) => println!(
            "{path}: {:.2} s, {} frames decoded ({:.0} frames/s), {} sampled, {}x{} {}",
            secs,
            d.frames_decoded,
            f64::from(d.frames_decoded) / secs,
            d.frames_sampled,
            d.width,
            d.height,
            d.codec
        ),
        other => println!("{path}: {other:?}"),
    }
}
