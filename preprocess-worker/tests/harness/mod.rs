//! Drives the real worker binary like the gateway does: inherited fds
//! (socket, tensor pool memfd, input region memfd), the handshake, image
//! jobs, and video jobs with a window of slots and a `Grant` back for each
//! slot after its `Frame` was read (as if the frame had been scored).

#![allow(dead_code)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use config::{Limits, ModelSpec};
use shm::{
    FromWorker, Input, InputRegion, PROTO_VERSION, PoolLayout, SampleMode, Sampling, SharedTensors,
    SlotRef, ToWorker, VideoDone, VideoFrame, VideoJob, WorkerInit, read_frame, write_frame,
};

pub const SLOTS: u32 = 8;
pub const INPUT_BYTES: usize = 4 << 20;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fixture photo's bytes.
pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/images").join(name)).unwrap()
}

pub fn model() -> ModelSpec {
    ModelSpec::load(&root().join("configs/models/open_nsfw.toml")).unwrap()
}

/// A generated clip; the clips come from `scripts/make_videos.sh`.
pub fn clip(name: &str) -> Vec<u8> {
    let path = root().join(".deps/videos").join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. The video test clips are generated: run `make test` \
             or `scripts/setup.sh test` first",
            path.display()
        )
    })
}

pub fn clip_path(name: &str) -> PathBuf {
    clip(name);
    root().join(".deps/videos").join(name)
}

pub fn sampling(mode: SampleMode) -> Sampling {
    Sampling {
        mode,
        keyframes_only: false,
        start: 0.0,
        end: None,
        max_frames: 1000,
        max_decoded: 100_000,
        max_decoded_pixels: u64::MAX,
        max_duration: 4.0 * 3600.0,
        deadline_ms: 60_000,
        decode_threads: 1,
    }
}

pub struct Worker {
    child: Child,
    pub gw: UnixStream,
    pub tensors: SharedTensors,
    pub inputs: InputRegion,
    generation: u64,
    next_job: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a video job produced.
#[derive(Debug)]
pub struct Run {
    pub frames: Vec<VideoFrame>,
    /// The tensor of each frame, read when its `Frame` arrived.
    pub tensors: Vec<Vec<f32>>,
    pub last: FromWorker,
}

impl Run {
    pub fn done(&self) -> &VideoDone {
        match &self.last {
            FromWorker::VideoDone(d) => d,
            other => panic!("expected VideoDone, got {other:?}"),
        }
    }

    pub fn times(&self) -> Vec<f64> {
        self.frames.iter().map(|f| f.t).collect()
    }
}

impl Worker {
    /// Closes the socket and waits for the worker to exit on its own.
    pub fn close(mut self) -> std::process::ExitStatus {
        let _ = self.gw.shutdown(std::net::Shutdown::Both);
        self.child.wait().unwrap()
    }

    pub fn start() -> Self {
        Self::start_with(Limits::default())
    }

    pub fn start_with(limits: Limits) -> Self {
        let model = model();
        let layout = PoolLayout::new(&[(SLOTS, model.input.sample_bytes())]);
        let tensors = SharedTensors::create(layout.clone()).unwrap();
        let inputs = InputRegion::create(2, INPUT_BYTES).unwrap();
        let (gw, child_end) = UnixStream::pair().unwrap();
        gw.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_preprocess-worker"));
        cmd.args([
            "--ipc-fd",
            "3",
            "--tensor-fd",
            "4",
            "--input-fd",
            "5",
            "--parent-pid",
        ])
        .arg(std::process::id().to_string())
        .fd_mappings(vec![
            FdMapping {
                parent_fd: child_end.into(),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: dup(tensors.fd()),
                child_fd: 4,
            },
            FdMapping {
                parent_fd: dup(inputs.fd().as_fd()),
                child_fd: 5,
            },
        ])
        .unwrap();
        let child = cmd.spawn().unwrap();
        let mut w = Worker {
            child,
            gw,
            tensors,
            inputs,
            generation: 0,
            next_job: 0,
        };
        let FromWorker::Hello(hello) = w.recv() else {
            panic!("expected Hello")
        };
        assert_eq!(hello.proto_version, PROTO_VERSION);
        let init = WorkerInit {
            worker_id: 0,
            threads: 2,
            layout,
            input_slot_bytes: INPUT_BYTES,
            models: vec![model],
            limits,
        };
        w.send(&ToWorker::Init(init));
        assert_eq!(w.recv(), FromWorker::Ready);
        w
    }

    pub fn send(&mut self, m: &ToWorker) {
        write_frame(&mut self.gw, m).unwrap();
    }

    pub fn recv(&mut self) -> FromWorker {
        read_frame::<FromWorker>(&mut self.gw)
            .unwrap()
            .expect("worker closed the socket")
    }

    /// A freshly leased slot (new generation stamped).
    pub fn lease(&mut self, slot: u32) -> SlotRef {
        self.generation += 1;
        let s = SlotRef {
            model: 0,
            slot,
            generation: self.generation,
        };
        self.tensors.stamp(s).unwrap();
        s
    }

    /// Sends a video job for `data` (copied into input slot 0) holding
    /// slots `0..window`; returns its job id.
    pub fn submit(&mut self, data: &[u8], sampling: Sampling, window: u32) -> u64 {
        self.inputs.write(0, data).unwrap();
        let input = Input::Shared {
            index: 0,
            len: data.len(),
        };
        self.submit_input(input, sampling, window)
    }

    pub fn submit_input(&mut self, input: Input, sampling: Sampling, window: u32) -> u64 {
        self.next_job += 1;
        let slots = (0..window).map(|s| self.lease(s)).collect();
        let job = VideoJob {
            job_id: self.next_job,
            ctx: shm::RequestContext {
                request_id: format!("req-{}", self.next_job),
                ..Default::default()
            },
            model: 0,
            input,
            sampling,
            slots,
        };
        self.send(&ToWorker::Video(job));
        self.next_job
    }

    /// Reads the job's messages to its end, granting each slot back (with a
    /// new generation) after reading its tensor.
    pub fn collect(&mut self, job_id: u64) -> Run {
        let (mut frames, mut tensors) = (Vec::new(), Vec::new());
        loop {
            match self.recv() {
                FromWorker::Frame(f) => {
                    assert_eq!(f.job_id, job_id);
                    tensors.push(self.tensors.read_f32(f.slot, |t| t.to_vec()).unwrap());
                    let slot = self.lease(f.slot.slot);
                    frames.push(f);
                    self.send(&ToWorker::Grant { job_id, slot });
                }
                last => {
                    return Run {
                        frames,
                        tensors,
                        last,
                    };
                }
            }
        }
    }

    pub fn run(&mut self, data: &[u8], sampling: Sampling) -> Run {
        let id = self.submit(data, sampling, 4);
        self.collect(id)
    }
}

pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Runs the ffmpeg CLI quietly with `args`.
fn ffmpeg(args: &[&str]) {
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(args)
        .status()
        .expect("running the ffmpeg CLI");
    assert!(status.success(), "ffmpeg {args:?}");
}

/// H.264 (no B-frames) of the test pattern, `seconds` long at 25 fps.
fn h264(size: &str, seconds: u32, filter: &str, format: &str, out: &std::path::Path) {
    let src = format!("testsrc2=duration={seconds}:size={size}:rate=25");
    let out = out.to_str().unwrap();
    ffmpeg(&[
        "-f", "lavfi", "-i", &src, "-vf", filter, "-c:v", "libx264", "-preset", "veryfast",
        "-pix_fmt", "yuv420p", "-bf", "0", "-f", format, out,
    ]);
}

/// Rewrites an MP4's stated durations (mvhd, tkhd, mdhd; version 0 boxes,
/// as ffmpeg writes them) to 1 s and turns its edit list into a `free`
/// box, so the samples themselves still run to their real end.
fn understate_mp4(mp4: &mut [u8]) {
    let find = |mp4: &[u8], fourcc: &[u8; 4]| {
        mp4.windows(4)
            .position(|w| w == fourcc)
            .unwrap_or_else(|| panic!("no {} box", String::from_utf8_lossy(fourcc)))
            + 4
    };
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mvhd = find(mp4, b"mvhd");
    assert_eq!(mp4[mvhd], 0, "mvhd version");
    let movie_scale = be32(mp4, mvhd + 12);
    mp4[mvhd + 16..mvhd + 20].copy_from_slice(&movie_scale.to_be_bytes());
    let tkhd = find(mp4, b"tkhd");
    assert_eq!(mp4[tkhd], 0, "tkhd version");
    mp4[tkhd + 20..tkhd + 24].copy_from_slice(&movie_scale.to_be_bytes());
    let mdhd = find(mp4, b"mdhd");
    assert_eq!(mp4[mdhd], 0, "mdhd version");
    let media_scale = be32(mp4, mdhd + 12);
    mp4[mdhd + 16..mdhd + 20].copy_from_slice(&media_scale.to_be_bytes());
    let edts = find(mp4, b"edts");
    mp4[edts - 4..edts].copy_from_slice(b"free");
}

/// Clips made on the fly, for what `make_videos.sh` does not cover:
/// `sar16.mp4` (320×240 stored, 16:1 sample aspect ratio: 5120×240 shown)
/// `grow.mkv` (320×240 for 1 s, then 1280×720 for 1 s; the header says
/// 320×240) and `understated.mp4` (10 s of frames whose movie, track and
/// media headers say 1 s, with no edit list).
pub fn made_clip(name: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("mmgate-made-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    match name {
        "sar16.mp4" => h264("320x240", 1, "setsar=16", "mp4", &out),
        "understated.mp4" => {
            h264("320x240", 10, "null", "mp4", &out);
            let mut mp4 = std::fs::read(&out).unwrap();
            understate_mp4(&mut mp4);
            std::fs::write(&out, mp4).unwrap();
        }
        "grow.mkv" => {
            let (a, b) = (dir.join("small.h264"), dir.join("large.h264"));
            h264("320x240", 1, "null", "h264", &a);
            h264("1280x720", 1, "null", "h264", &b);
            let mut both = std::fs::read(&a).unwrap();
            both.extend(std::fs::read(&b).unwrap());
            let raw = dir.join("both.h264");
            std::fs::write(&raw, both).unwrap();
            let (raw, o) = (raw.to_str().unwrap(), out.to_str().unwrap());
            ffmpeg(&["-fflags", "+genpts", "-r", "25", "-i", raw, "-c", "copy", o]);
        }
        other => panic!("no recipe for {other}"),
    }
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    data
}

/// The first frame of `clip` as the ffmpeg CLI shows it (auto-rotated
/// unless `pre` says otherwise; `post` are output options), as PNG bytes.
pub fn cli_png(clip: &str, pre: &[&str], post: &[&str]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("mmgate-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tag: String = pre
        .iter()
        .chain(post)
        .flat_map(|s| s.chars())
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let out = dir.join(format!("{clip}.{tag}.png"));
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(pre)
        .arg("-i")
        .arg(clip_path(clip))
        .args(post)
        .args(["-frames:v", "1"])
        .arg(&out)
        .status()
        .expect("running the ffmpeg CLI");
    assert!(status.success());
    let png = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    png
}
