//! Where OpenVINO really runs a model's inference, and at what priority:
//! the throughput instances' work on threads of the priority
//! `scheduling.throughput_priority` gives, the latency lane's at the
//! process's own. Its own test
//! binary: the threads of this process are the ones measured, and no other
//! test may run inference beside it.

mod common;

use std::collections::HashMap;

use config::{Precision, ThroughputPriority};
use gpu_executor::openvino_cpu::{self, StreamLayout};

/// Linux's `SCHED_IDLE` and `SCHED_OTHER` policies.
const SCHED_IDLE: i32 = 5;
const SCHED_OTHER: i32 = 0;

/// Every thread of this process: ((policy, nice), CPU ticks used so far).
fn threads() -> HashMap<u32, ((i32, i32), u64)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // The fields after the command name start at field 3: utime is
            // 14, stime 15, nice 19, policy 41.
            let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            let field = |n: usize| f[n - 3].parse::<i64>().ok();
            let ticks = (field(14)? + field(15)?) as u64;
            Some((tid, ((field(41)? as i32, field(19)? as i32), ticks)))
        })
        .collect()
}

/// The (policy, nice) of the threads that did most of the work `run` did
/// (each of them at least a fifth of the busiest one's ticks).
fn priority_of_the_work(run: &mut dyn FnMut()) -> Vec<(i32, i32)> {
    let before = threads();
    run();
    let after = threads();
    let used: Vec<((i32, i32), u64)> = after
        .iter()
        .map(|(tid, &(nice, t))| (nice, t - before.get(tid).map_or(0, |b| b.1)))
        .collect();
    let most = used.iter().map(|u| u.1).max().unwrap_or(0);
    assert!(most >= 20, "too little work to measure: {used:?}");
    let mut nice: Vec<(i32, i32)> = used
        .iter()
        .filter(|u| u.1 * 5 >= most)
        .map(|u| u.0)
        .collect();
    nice.sort_unstable();
    nice.dedup();
    nice
}

/// Each case in a process of its own: the thread pool's workers and
/// OpenVINO's stream executors outlive a compiled model, and one case's
/// must not be measured in the next.
#[test]
fn the_throughput_streams_run_below_the_process_and_the_lane_at_its_priority() {
    for case in ["idle", "low", "idle-wide"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "one_priority_case",
                "--include-ignored",
                "--nocapture",
            ])
            .env("PRIORITY_CASE", case)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "case {case}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One case of the test above (run by it, in a process of its own):
/// `idle` and `low` on this machine's layout; `idle-wide`, two threads per
/// throughput stream, where the streams share the thread pool's workers
/// with the lane: those start at the lane's priority, never below it.
#[test]
#[ignore = "run by the_throughput_streams_run_below_the_process_and_the_lane_at_its_priority"]
fn one_priority_case() {
    let case = std::env::var("PRIORITY_CASE").unwrap();
    let mut spec = common::open_nsfw();
    let (priority, threads) = match case.as_str() {
        "idle" => (ThroughputPriority::Idle, 0),
        "low" => (ThroughputPriority::Low, 0),
        "idle-wide" => (ThroughputPriority::Idle, 4),
        other => panic!("no case {other}"),
    };
    spec.openvino.threads = threads;
    openvino_cpu::library(&common::openvino_library()).unwrap();
    let own = rustix::process::getpriority_process(None).unwrap();
    let background = match priority {
        ThroughputPriority::Low => (SCHED_OTHER, (own + 10).min(19)),
        _ => (SCHED_IDLE, own),
    };
    let sample = common::sample(&spec, 0);
    let batch = [sample.as_slice(); 4].concat();
    let layout = StreamLayout::of(&spec, priority);
    assert!(layout.lane_threads.is_some(), "{layout:?}");
    let says = match priority {
        ThroughputPriority::Low => "nice +10",
        _ => "idle priority",
    };
    assert!(layout.describe().contains(says), "{}", layout.describe());
    let mut loaded = openvino_cpu::load(&spec, Precision::F32, layout, None).unwrap();
    let (lanes, mut rest): (Vec<_>, Vec<_>) =
        loaded.engines.drain(..).partition(|e| e.latency_lane());
    let mut lane = lanes.into_iter().next().expect("a latency lane");
    let work = priority_of_the_work(&mut || {
        for _ in 0..30 {
            rest[0].run(&batch, 4).unwrap();
        }
    });
    if threads == 0 {
        assert_eq!(work, [background], "throughput instance, {case}");
    } else {
        assert!(
            work.contains(&background),
            "throughput instance, {case}: {work:?}"
        );
    }
    let work = priority_of_the_work(&mut || {
        for _ in 0..30 {
            lane.run(&batch, 4).unwrap();
        }
    });
    assert_eq!(work, [(SCHED_OTHER, own)], "latency lane, {case}");
}
