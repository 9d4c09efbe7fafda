//! Video jobs end to end through the real worker binary, on the clips that
//! `scripts/make_videos.sh` generates into `.deps/videos/`: exact sampled
//! timestamps, decoder skipping, codecs, rotation and aspect ratio against
//! what the ffmpeg CLI shows, failures, caps, and the grant-driven stream.

mod harness;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use config::Limits;
use harness::*;
use preprocess_worker::preprocess;
use shm::{FromWorker, Input, JobErrorKind, SampleMode, ToWorker};

fn assert_times(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

fn seconds(range: std::ops::Range<u32>) -> Vec<f64> {
    range.map(f64::from).collect()
}

fn failure(run: &harness::Run) -> (JobErrorKind, String) {
    match &run.last {
        FromWorker::Failed { error, .. } => (error.kind, error.message.clone()),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn png_tensor(png: &[u8]) -> Vec<f32> {
    let model = model();
    let mut out = vec![0f32; model.input.elements()];
    let deadline = Instant::now() + Duration::from_secs(30);
    preprocess(png, &model, &Limits::default(), deadline, &mut out).unwrap();
    out
}

#[test]
fn fps_samples_the_first_frame_at_or_after_each_whole_second() {
    let mut w = Worker::start();
    let run = w.run(&clip("h264.mp4"), sampling(SampleMode::Fps(1.0)));
    assert_times(&run.times(), &seconds(0..10));
    let d = run.done();
    // Decoding stops at the last sample (t = 9 s, frame 226): no target is
    // left before the 10 s end.
    assert_eq!((d.frames_decoded, d.frames_sampled), (226, 10));
    assert!(d.complete && !d.truncated, "{d:?}");
    assert_eq!((d.width, d.height, d.codec.as_str()), (320, 240, "h264"));
    assert!((d.duration - 10.0).abs() < 0.01, "{d:?}");
    for t in &run.tensors {
        assert!(t.iter().all(|v| (-123.0..=151.0).contains(v)));
    }
    // Successive seconds of a moving pattern differ.
    assert!(mean_abs_diff(&run.tensors[0], &run.tensors[1]) > 1.0);

    let run = w.run(&clip("h264.mp4"), sampling(SampleMode::Fps(2.5)));
    let want: Vec<f64> = (0..25).map(|k| f64::from(k) * 0.4).collect();
    assert_times(&run.times(), &want);
}

#[test]
fn frame_count_spreads_targets_over_the_duration_or_range() {
    let mut w = Worker::start();
    let run = w.run(&clip("h264.mp4"), sampling(SampleMode::Count(5)));
    assert_times(&run.times(), &[0.0, 2.0, 4.0, 6.0, 8.0]);
    // Targets 0, 3.333, 6.667: the first frames at or after them (25 fps).
    let run = w.run(&clip("h264.mp4"), sampling(SampleMode::Count(3)));
    assert_times(&run.times(), &[0.0, 3.36, 6.68]);
    assert!(run.done().complete && !run.done().truncated);
    // A range: seeks to the keyframe before start and stops after end.
    let mut s = sampling(SampleMode::Fps(1.0));
    (s.start, s.end) = (3.5, Some(7.0));
    let run = w.run(&clip("h264.mp4"), s);
    assert_times(&run.times(), &[3.52, 4.52, 5.52, 6.52]);
    let d = run.done();
    assert!(
        d.frames_decoded < 150,
        "decoded {} frames for 3.5 s",
        d.frames_decoded
    );
    assert!(d.complete && !d.truncated, "{d:?}");
}

#[test]
fn keyframes_only_really_skips_decoding() {
    let mut w = Worker::start();
    let mut s = sampling(SampleMode::Fps(1.0));
    s.keyframes_only = true;
    let run = w.run(&clip("h264.mp4"), s);
    // GOP of 50 frames at 25 fps: a keyframe every 2 s.
    assert_times(&run.times(), &[0.0, 2.0, 4.0, 6.0, 8.0]);
    let d = run.done();
    assert_eq!(d.frames_decoded, 5, "{d:?}");
    let mut s = sampling(SampleMode::All);
    s.keyframes_only = true;
    assert_eq!(w.run(&clip("h264.mp4"), s).frames.len(), 5);
}

#[test]
fn hevc_10_bit_vp9_av1_and_mpeg4_decode() {
    let mut w = Worker::start();
    let mut clips = vec![
        ("hevc10.mp4", "hevc", 4),
        ("vp9.webm", "vp9", 4),
        ("mpeg4.mkv", "mpeg4", 2),
    ];
    if root().join(".deps/videos/av1.mkv").exists() {
        clips.push(("av1.mkv", "av1", 2));
    }
    for (name, codec, secs) in clips {
        let run = w.run(&clip(name), sampling(SampleMode::Fps(1.0)));
        assert_times(&run.times(), &seconds(0..secs));
        let d = run.done();
        assert_eq!(
            (d.codec.as_str(), d.width, d.height),
            (codec, 320, 240),
            "{name}"
        );
        assert!(d.complete && !d.truncated, "{name}: {d:?}");
        // Same test pattern as the CLI shows it: close to its first frame.
        let reference = png_tensor(&cli_png(name, &[], &[]));
        let diff = mean_abs_diff(&run.tensors[0], &reference);
        assert!(diff < 2.0, "{name}: mean abs diff {diff}");
    }
}

#[test]
fn rotation_and_aspect_ratio_match_what_the_cli_shows() {
    let mut w = Worker::start();
    for (name, size) in [
        ("rotated.mov", (240, 320)),
        ("rotated180.mov", (320, 240)),
        ("rotated270.mp4", (240, 320)),
    ] {
        let run = w.run(&clip(name), sampling(SampleMode::Fps(1.0)));
        let d = run.done();
        assert_eq!((d.width, d.height), size, "{name}: {d:?}");
        let shown = png_tensor(&cli_png(name, &[], &[]));
        let stored = png_tensor(&cli_png(name, &["-noautorotate"], &[]));
        let right = mean_abs_diff(&run.tensors[0], &shown);
        let wrong = mean_abs_diff(&run.tensors[0], &stored);
        assert!(
            right < 2.0 && wrong > 5.0 * right,
            "{name}: as shown {right}, as stored {wrong}"
        );
    }

    let run = w.run(&clip("sar.mp4"), sampling(SampleMode::Fps(1.0)));
    let d = run.done();
    assert_eq!((d.width, d.height), (640, 240), "{d:?}");
    let shown = png_tensor(&cli_png(
        "sar.mp4",
        &[],
        &["-vf", "scale=iw*sar:ih,setsar=1"],
    ));
    let square = png_tensor(&cli_png("sar.mp4", &[], &[]));
    let right = mean_abs_diff(&run.tensors[0], &shown);
    let wrong = mean_abs_diff(&run.tensors[0], &square);
    assert!(
        right < 2.0 && wrong > 2.0 * right,
        "stretched {right}, square {wrong}"
    );
}

#[test]
fn variable_frame_rate_is_sampled_by_timestamps() {
    let mut w = Worker::start();
    // 25 frames 40 ms apart, then 30 frames 200 ms apart (from t = 1).
    let run = w.run(&clip("vfr.mkv"), sampling(SampleMode::Fps(10.0)));
    let mut want = vec![0.0, 0.12, 0.2, 0.32, 0.4, 0.52, 0.6, 0.72, 0.8, 0.92];
    want.extend((0..30).map(|k| 1.0 + 0.2 * f64::from(k)));
    assert_times(&run.times(), &want);
    assert_eq!(run.done().frames_decoded, 55);
}

#[test]
fn bad_inputs_fail_with_the_right_kind() {
    let mut w = Worker::start();
    let run = w.run(&clip("audio_only.m4a"), sampling(SampleMode::Fps(1.0)));
    let (kind, message) = failure(&run);
    assert_eq!(kind, JobErrorKind::Undecodable);
    assert!(message.contains("no video stream"), "{message}");
    assert!(run.frames.is_empty());

    let junk = Input::Inline(b"this is not a video at all, just some text".to_vec());
    let id = w.submit_input(junk, sampling(SampleMode::Fps(1.0)), 2);
    let (kind, message) = failure(&w.collect(id));
    assert_eq!(kind, JobErrorKind::Unsupported, "{message}");

    let mut s = sampling(SampleMode::Fps(1.0));
    s.max_duration = 3600.0;
    let (kind, message) = failure(&w.run(&clip("long.mp4"), s));
    assert_eq!(kind, JobErrorKind::TooLarge);
    assert!(
        message.contains("10800.0 s") && message.contains("3600"),
        "{message}"
    );
}

#[test]
fn frames_displayed_over_the_image_limits_are_too_large() {
    let limits = Limits {
        max_dimension: 1000,
        ..Limits::default()
    };
    let mut w = Worker::start_with(limits);
    // The header says 320×240 in both; the frames are wider or larger.
    let run = w.run(&made_clip("sar16.mp4"), sampling(SampleMode::Fps(1.0)));
    let (kind, message) = failure(&run);
    assert_eq!(kind, JobErrorKind::TooLarge, "{message}");
    assert!(
        message.contains("5120×240") && message.contains("1000 pixels per side"),
        "{message}"
    );
    assert!(run.frames.is_empty());

    let run = w.run(&made_clip("grow.mkv"), sampling(SampleMode::Fps(1.0)));
    let (kind, message) = failure(&run);
    assert_eq!(kind, JobErrorKind::TooLarge, "{message}");
    assert!(message.contains("1280×720"), "{message}");
    assert_times(&run.times(), &[0.0]);
}

#[test]
fn a_cut_file_keeps_its_good_frames_and_says_incomplete() {
    let mut w = Worker::start();
    let run = w.run(&clip("truncated.mp4"), sampling(SampleMode::Fps(1.0)));
    let d = run.done();
    assert!(!d.complete, "{d:?}");
    assert!(d.frames_sampled > 0 && d.frames_sampled < 10, "{d:?}");
    assert_times(&run.times(), &seconds(0..d.frames_sampled));
    // Inline input (a memfd of its own) gives the same answer.
    let id = w.submit_input(
        Input::Inline(clip("truncated.mp4")),
        sampling(SampleMode::Fps(1.0)),
        2,
    );
    assert_eq!(w.collect(id).done().frames_sampled, d.frames_sampled);
}

#[test]
fn caps_stop_a_three_hour_video_early() {
    let mut w = Worker::start();
    let mut s = sampling(SampleMode::Fps(1.0));
    s.max_frames = 256;
    let run = w.run(&clip("long.mp4"), s);
    let d = run.done();
    assert!(d.truncated && d.complete, "{d:?}");
    assert_eq!(d.frames_sampled, 256);
    assert_times(&run.times(), &seconds(0..256));
    // Demuxing stopped at the cap: nowhere near the 10 800 frames.
    assert!(d.frames_decoded <= 257, "{d:?}");

    let mut s = sampling(SampleMode::All);
    s.max_decoded = 40;
    let d = w.run(&clip("h264.mp4"), s).done().clone();
    assert_eq!(
        (d.frames_decoded, d.frames_sampled, d.truncated),
        (40, 40, true)
    );
}

#[test]
fn frames_stream_within_the_granted_window() {
    let mut w = Worker::start();
    w.gw.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let job = w.submit(&clip("h264.mp4"), sampling(SampleMode::Fps(1.0)), 2);
    let mut frames = Vec::new();
    for _ in 0..2 {
        match w.recv() {
            FromWorker::Frame(f) => frames.push(f),
            other => panic!("{other:?}"),
        }
    }
    // Both slots are full: the worker must wait for a grant.
    w.gw.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1];
    let err = std::io::Read::read(&mut w.gw, &mut buf).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    w.gw.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    for f in &frames {
        let slot = w.lease(f.slot.slot);
        w.send(&ToWorker::Grant { job_id: job, slot });
    }
    let rest = w.collect(job);
    let mut times: Vec<f64> = frames.iter().map(|f| f.t).collect();
    times.extend(rest.times());
    assert_times(&times, &seconds(0..10));
    assert_eq!(rest.done().frames_sampled, 10);
}

#[test]
fn the_deadline_bounds_the_wait_for_a_grant_and_cancel_stops_a_job() {
    let mut w = Worker::start();
    let mut s = sampling(SampleMode::Fps(1.0));
    s.deadline_ms = 700;
    let job = w.submit(&clip("h264.mp4"), s, 1);
    let started = Instant::now();
    assert!(matches!(w.recv(), FromWorker::Frame(_)));
    let FromWorker::VideoDone(d) = w.recv() else {
        panic!("expected VideoDone")
    };
    assert_eq!(d.job_id, job);
    assert!(d.truncated && d.frames_sampled == 1, "{d:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let job = w.submit(&clip("long.mp4"), sampling(SampleMode::All), 1);
    assert!(matches!(w.recv(), FromWorker::Frame(_)));
    w.send(&ToWorker::Cancel { job_id: job });
    let FromWorker::VideoDone(d) = w.recv() else {
        panic!("expected VideoDone")
    };
    assert!(d.truncated && d.frames_sampled == 1, "{d:?}");
}

#[test]
fn corrupted_clips_never_crash_or_hang_the_worker() {
    let mut w = Worker::start();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for name in ["h264.mp4", "vp9.webm", "hevc10.mp4", "vfr.mkv"] {
        let good = clip(name);
        for round in 0..12 {
            let mut bad = good.clone();
            if round % 3 == 0 {
                bad.truncate(next() as usize % good.len());
            }
            for _ in 0..(1 + next() % 64) {
                let i = next() as usize % bad.len().max(1);
                if let Some(b) = bad.get_mut(i) {
                    *b = next() as u8;
                }
            }
            let mut s = sampling(SampleMode::Fps(5.0));
            s.deadline_ms = 10_000;
            let started = Instant::now();
            let run = w.run(&bad, s);
            assert!(
                matches!(
                    run.last,
                    FromWorker::VideoDone(_) | FromWorker::Failed { .. }
                ),
                "{name} round {round}: {:?}",
                run.last
            );
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{name} round {round}"
            );
        }
    }
}

#[test]
fn decoding_stops_once_no_further_sample_can_be_taken_and_pixels_are_capped() {
    let mut w = Worker::start();
    // One target at 0 s, the next at 1000 s of a 10 s clip: nothing more to
    // decode after the first frame.
    let run = w.run(&clip("h264.mp4"), sampling(SampleMode::Fps(0.001)));
    assert_times(&run.times(), &[0.0]);
    let d = run.done();
    assert!(
        d.frames_decoded <= 2,
        "decoded {} frames after its only sample",
        d.frames_decoded
    );
    assert!(d.complete && !d.truncated, "{d:?}");
    // Decoded pixels bound the work: 20 frames of 320×240.
    let mut s = sampling(SampleMode::Fps(25.0));
    s.max_decoded_pixels = 20 * 320 * 240;
    let run = w.run(&clip("h264.mp4"), s);
    let d = run.done();
    assert_eq!((d.frames_decoded, d.frames_sampled), (20, 20), "{d:?}");
    assert!(d.truncated, "{d:?}");
}

/// A file whose headers say 1 s but whose samples run 10 s must not have
/// 9 s scored by nobody: sampling goes on past the stated end, the answer
/// gives the real duration, and the real duration meets `max_duration`.
#[test]
fn a_stated_duration_shorter_than_the_stream_is_not_trusted() {
    let mut w = Worker::start();
    let clip = made_clip("understated.mp4");
    let run = w.run(&clip, sampling(SampleMode::Fps(1.0)));
    assert_times(&run.times(), &seconds(0..10));
    let d = run.done();
    assert!(d.complete && !d.truncated, "{d:?}");
    assert!(d.duration > 9.9, "reported duration {}", d.duration);
    // Count targets were spread over the stated second: what followed was
    // not sampled, and the answer says so.
    let d = w.run(&clip, sampling(SampleMode::Count(4))).done().clone();
    assert_eq!(d.frames_sampled, 4, "{d:?}");
    assert!(d.truncated, "{d:?}");
    // Every frame, each once, though the decoder seeks back to a keyframe
    // to go on past the stated end.
    let run = w.run(&clip, sampling(SampleMode::All));
    let times = run.times();
    assert_eq!(times.len(), 250, "{:?}", run.done());
    assert!(times.windows(2).all(|w| w[0] < w[1]), "a frame came twice");
    // A request end past the stated duration is sampled to that end.
    let mut s = sampling(SampleMode::Fps(1.0));
    s.end = Some(7.5);
    assert_times(&w.run(&clip, s).times(), &seconds(0..8));
    // The real duration is held to max_duration while decoding.
    let mut s = sampling(SampleMode::Fps(1.0));
    s.max_duration = 5.0;
    let run = w.run(&clip, s);
    assert_times(&run.times(), &seconds(0..6));
    assert!(run.done().truncated, "{:?}", run.done());
}
