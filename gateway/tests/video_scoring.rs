//! Video end to end through the real binaries, on clips that
//! `scripts/make_videos.sh` generates with the ffmpeg CLI.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn clip(name: &str) -> PathBuf {
    let p = repo().join(".deps/videos").join(name);
    assert!(
        p.is_file(),
        "{} missing: run `make test` (scripts/setup.sh test)",
        p.display()
    );
    p
}

async fn score_video(gw: &Gateway, name: &str, query: &str) -> Reply {
    let body = std::fs::read(clip(name)).unwrap();
    let r = gw
        .client
        .post(gw.url(&format!("/v1/models/open_nsfw/score?{query}")))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    Reply::read(r).await
}

fn times(r: &Reply) -> Vec<f64> {
    r.json["frames"]
        .as_array()
        .unwrap_or_else(|| panic!("no frames in {}", r.json))
        .iter()
        .map(|f| (f["t"].as_f64().unwrap() * 1000.0).round() / 1000.0)
        .collect()
}

/// The frame at `t` extracted by the ffmpeg CLI as PNG (it applies rotation).
fn cli_frame(name: &str, t: f64) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("mmgate-{}-{name}-{t}.png", std::process::id()));
    let st = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(clip(name))
        .args(["-vf", &format!("select=gte(t\\,{t})"), "-frames:v", "1"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let b = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(out);
    b
}

async fn leased(gw: &Gateway) -> f64 {
    gw.metric("mmgate_shm_slots", "state=\"leased\"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fps_and_frames_sample_exact_timestamps_and_match_the_image_path() {
    let gw = Gateway::start("").await;
    let r = score_video(&gw, "h264.mp4", "fps=1").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(times(&r), (0..10).map(f64::from).collect::<Vec<_>>());
    assert_eq!(r.json["frames_sampled"], 10);
    assert_eq!(r.json["complete"], true);
    assert_eq!(r.json["truncated"], false);
    assert!((r.json["duration"].as_f64().unwrap() - 10.0).abs() < 0.1);
    assert_eq!(
        (r.json["width"].as_u64(), r.json["height"].as_u64()),
        (Some(320), Some(240))
    );
    let agg = &r.json["aggregate"];
    assert!(agg["max"]["nsfw"].as_f64().unwrap() >= agg["mean"]["nsfw"].as_f64().unwrap());
    // Every frame scores like the same frame sent as a PNG.
    for f in r.json["frames"].as_array().unwrap().iter().step_by(3) {
        let t = f["t"].as_f64().unwrap();
        let img = gw
            .score("open_nsfw", cli_frame("h264.mp4", t), "image/png")
            .await;
        let (v, i) = (f["scores"]["nsfw"].as_f64().unwrap(), img.nsfw());
        println!("t={t}: video {v:.5} png {i:.5}");
        assert!(close_enough(i, v), "frame at {t}: video {v} vs png {i}");
    }
    let r = score_video(&gw, "h264.mp4", "frames=5").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(times(&r), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
    // 25 fps: the first frame at or after 3.5 s is the one at 3.52 s.
    let r = score_video(&gw, "h264.mp4", "fps=2&start=3&end=5").await;
    assert_eq!(times(&r), vec![3.0, 3.52, 4.0, 4.52]);
    let r = score_video(&gw, "h264.mp4", "fps=1&frames=3").await;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    assert_eq!(leased(&gw).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyframes_only_decodes_fewer_frames() {
    let gw = Gateway::start("").await;
    let all = score_video(&gw, "h264.mp4", "fps=1").await;
    let key = score_video(&gw, "h264.mp4", "keyframes=true").await;
    assert_eq!(key.status, 200, "{}", key.json);
    let (a, k) = (
        all.json["frames_decoded"].as_u64().unwrap(),
        key.json["frames_decoded"].as_u64().unwrap(),
    );
    println!("frames decoded: all {a}, keyframes only {k}");
    assert!(k > 0 && k * 5 <= a, "keyframes only decoded {k} of {a}");
    assert_eq!(key.json["frames_sampled"].as_u64(), Some(k));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codecs_rotation_and_broken_inputs() {
    let gw = Gateway::start("[video]\nmax_frames = 16\n").await;
    for (name, codec) in [("hevc10.mp4", "hevc"), ("vp9.webm", "vp9")] {
        let r = score_video(&gw, name, "fps=1").await;
        assert_eq!(r.status, 200, "{name}: {}", r.json);
        assert_eq!(r.json["codec"], codec, "{name}");
        assert!(r.json["frames_sampled"].as_u64().unwrap() >= 3, "{name}");
    }
    // Rotation metadata is honoured: the frame scores like the CLI's upright PNG.
    let r = score_video(&gw, "rotated.mov", "frames=1").await;
    assert_eq!(r.status, 200, "{}", r.json);
    let v = r.json["frames"][0]["scores"]["nsfw"].as_f64().unwrap();
    let img = gw
        .score("open_nsfw", cli_frame("rotated.mov", 0.0), "image/png")
        .await;
    assert_eq!(
        img.json["results"][0]["width"], 240,
        "the CLI frame is upright"
    );
    assert!(
        close_enough(img.nsfw(), v),
        "rotated: video {v} vs png {}",
        img.nsfw()
    );
    let r = score_video(&gw, "audio_only.m4a", "").await;
    assert_eq!(
        (r.status, r.code()),
        (422, "undecodable_video"),
        "{}",
        r.json
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no video stream")
    );
    let r = score_video(&gw, "truncated.mp4", "fps=1").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["complete"], false);
    assert!(r.json["frames_sampled"].as_u64().unwrap() > 0);
    // A 3-hour video at fps=1 stops at the frame cap, fast.
    let t = Instant::now();
    let r = score_video(&gw, "long.mp4", "fps=1").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["truncated"], true);
    assert_eq!(r.json["frames_sampled"], 16);
    assert_eq!(r.json["frames"].as_array().unwrap().len(), 16);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(leased(&gw).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_worker_mid_video_is_a_clean_error_without_leaks() {
    let gw = Gateway::start("").await;
    let before = gw.children("preprocess-work");
    let body = std::fs::read(clip("h264.mp4")).unwrap();
    let req = gw
        .client
        .post(gw.url("/v1/models/open_nsfw/score?fps=25"))
        .body(body)
        .send();
    let pending = tokio::spawn(req);
    let t = Instant::now();
    while leased(&gw).await < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "video never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for &p in &before {
        kill(Pid::from_raw(p as i32), Signal::SIGKILL).unwrap();
    }
    let r = Reply::read(pending.await.unwrap().unwrap()).await;
    assert!(r.status >= 500, "{}: {}", r.status, r.json);
    assert_eq!(r.code(), "worker_crashed", "{}", r.json);
    gw.wait_ready(Duration::from_secs(2)).await;
    let t = Instant::now();
    while leased(&gw).await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "slots leaked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = score_video(&gw, "h264.mp4", "frames=2").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_videos_run_at_once_within_their_worker_share() {
    // 2 workers × 2 threads: videos may hold half, i.e. two threads.
    let gw = Gateway::start("[workers]\nthreads = 2\n").await;
    let window = 4.0; // video.slots_per_request
    let send = || {
        let body = std::fs::read(clip("h264.mp4")).unwrap();
        tokio::spawn(
            gw.client
                .post(gw.url("/v1/models/open_nsfw/score?fps=10"))
                .body(body)
                .send(),
        )
    };
    let (a, b) = (send(), send());
    // A queued video holds no slot; more than one window leased at once
    // means both are being decoded.
    let mut most: f64 = 0.0;
    while !(a.is_finished() && b.is_finished()) {
        most = most.max(leased(&gw).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    println!("most slots leased at once: {most}");
    assert!(
        most > window,
        "the two videos never overlapped (max {most} slots)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn videos_over_the_duration_or_size_limit_are_413() {
    let gw = Gateway::start("[video]\nmax_duration_s = 5.0\nmax_body_bytes = 2000000\n").await;
    let r = score_video(&gw, "h264.mp4", "fps=1").await;
    assert_eq!((r.status, r.code()), (413, "video_too_large"), "{}", r.json);
    let msg = r.json["error"]["message"].as_str().unwrap();
    assert!(msg.contains('5'), "the message names the limit: {msg}");
    let mut big = std::fs::read(clip("h264.mp4")).unwrap();
    big.resize(2_000_001, 0);
    let r = gw
        .client
        .post(gw.url("/v1/models/open_nsfw/score"))
        .body(big)
        .send()
        .await
        .unwrap();
    let r = Reply::read(r).await;
    assert_eq!(
        (r.status, r.code()),
        (413, "payload_too_large"),
        "{}",
        r.json
    );
    assert_eq!(leased(&gw).await, 0.0);
}

/// Two uploads that cost a worker seconds each (200 frames of 4096², all
/// sampled) on the default 2 × 1 pool: videos get one thread, images the
/// other, so images keep their normal latency; the second video waits its
/// turn and, past `queue_timeout_ms`, gets 503 at that time, not later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_videos_cannot_starve_images_and_the_queue_timeout_holds() {
    let gw = Gateway::start("[server]\nqueue_timeout_ms = 1500\n").await;
    let send = |delay_ms: u64| {
        let body = std::fs::read(clip("huge.mp4")).unwrap();
        let req = gw
            .client
            .post(gw.url("/v1/models/open_nsfw/score?fps=25"))
            .body(body)
            .send();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let t = Instant::now();
            let r = Reply::read(req.await.unwrap()).await;
            (r, t.elapsed())
        })
    };
    let (first, second) = (send(0), send(100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r = gw.good_image().await;
        assert_eq!(
            r.status, 200,
            "an image failed next to hostile videos: {}",
            r.json
        );
        worst = worst.max(t.elapsed());
    }
    println!("slowest image next to two hostile videos: {worst:?}");
    assert!(
        worst < Duration::from_millis(1000),
        "images starved: {worst:?}"
    );
    let (second, waited) = second.await.unwrap();
    let (first, took) = first.await.unwrap();
    println!(
        "first video {took:?} ({}), second {waited:?} ({})",
        first.status, second.status
    );
    assert_eq!(first.status, 200, "{}", first.json);
    // The first held the one video thread past the second's timeout.
    assert!(
        took > Duration::from_millis(2500),
        "the hostile video took only {took:?}"
    );
    assert_eq!(
        (second.status, second.code()),
        (503, "queue_timeout"),
        "{}",
        second.json
    );
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(2000),
        "queue_timeout_ms = 1500 answered after {waited:?}"
    );
}

/// While a worker is down (here held down by its restart backoff), fewer
/// threads are alive than configured: a video must still leave a live
/// thread to images. On the default 2 × 1 pool with one worker down, a
/// costly video waits for the restart, and images keep their latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_leaves_the_last_live_thread_to_images_while_a_worker_restarts() {
    let gw = Gateway::start("").await;
    let ready = || gw.metric("mmgate_children_ready", "pool=\"preprocess\"");
    // Kill the same worker slot as soon as each replacement is up: the
    // backoff doubles from 100 ms, so the sixth restart waits 3.2 s.
    let first = gw.children("preprocess-work");
    let (mut victim, other) = (first[0], first[1]);
    let mut killed = Vec::new();
    for round in 0..6 {
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        killed.push(victim);
        if round == 5 {
            break;
        }
        let t = Instant::now();
        victim = loop {
            let fresh: Vec<u32> = gw
                .children("preprocess-work")
                .into_iter()
                .filter(|p| *p != other && !killed.contains(p))
                .collect();
            if let [p] = fresh[..]
                && ready().await == 2.0
            {
                break p;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
    }
    let t = Instant::now();
    while ready().await != 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the death went unseen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let down_since = Instant::now();
    // A video that costs its thread seconds, sent while one thread lives.
    let body = std::fs::read(clip("huge.mp4")).unwrap();
    let video = tokio::spawn(
        gw.client
            .post(gw.url("/v1/models/open_nsfw/score?fps=25"))
            .body(body)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    while down_since.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let r = gw.good_image().await;
        assert_eq!(r.status, 200, "{}", r.json);
        worst = worst.max(t.elapsed());
    }
    println!("slowest image while a worker was down: {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "the video took the last live thread: an image waited {worst:?}"
    );
    let r = Reply::read(video.await.unwrap().unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// Video frames take the images' path from slot to scores: a video's
/// `queue_ms` is its real wait for a worker thread, and its frames appear
/// in the stage histograms like images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_videos_queue_time_and_frames_are_measured_like_images() {
    let gw = Gateway::start("[workers]\ncount = 1\nthreads = 1\n").await;
    let (a, b) = tokio::join!(
        score_video(&gw, "h264.mp4", "fps=1"),
        score_video(&gw, "h264.mp4", "fps=1")
    );
    for r in [&a, &b] {
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let queue = |r: &Reply| r.json["timings"]["queue_ms"].as_f64().unwrap();
    let frames = |r: &Reply| r.json["frames_sampled"].as_f64().unwrap();
    // One worker thread: one of the two waited for the other's decode.
    let waited = queue(&a).max(queue(&b));
    assert!(waited > 5.0, "queue_ms {} and {}", queue(&a), queue(&b));
    let count = |stage: &'static str| {
        let filter = format!("stage=\"{stage}\"");
        let gw = &gw;
        async move {
            gw.metric("mmgate_stage_duration_seconds_count", &filter)
                .await
        }
    };
    assert_eq!(count("queue").await, 2.0);
    assert_eq!(count("decode").await, 2.0);
    assert_eq!(count("inference").await, frames(&a) + frames(&b));
    assert_eq!(count("batch_wait").await, frames(&a) + frames(&b));
}
