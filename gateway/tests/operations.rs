//! Running mmgate: executor heartbeats and `/readyz`, models loaded and
//! unloaded live, config reloads, CPU pinning.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, fixture, tenant, write_config};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::Method;

const ADMIN_KEY: &str = "admin-secret-7f3a9c";

/// `POST path` on the admin listener, with the admin key.
async fn post(gw: &Gateway, path: &str) -> common::Reply {
    gw.admin(Method::POST, path, Some(ADMIN_KEY), None).await
}

async fn readyz(gw: &Gateway) -> common::Reply {
    gw.get("/readyz").await
}

/// The executor's pid, once a replaced one (retiring) is gone.
async fn executor_pid(gw: &Gateway) -> u32 {
    gw.wait_children("gpu-executor", 1).await;
    gw.children("gpu-executor")[0]
}

/// Polls `/readyz` (and `/healthz` each time) until `want`; answers how
/// long it took and the last `/readyz` body.
async fn until_ready_is(
    gw: &Gateway,
    want: bool,
    within: Duration,
) -> (Duration, serde_json::Value) {
    let t = Instant::now();
    loop {
        let r = readyz(gw).await;
        assert_eq!(r.status == 200, r.json["ready"] == true, "{}", r.json);
        let health = gw.get("/healthz").await;
        assert_eq!(health.status, 200, "/healthz while the gateway serves");
        if (r.status == 200) == want {
            return (t.elapsed(), r.json);
        }
        assert!(
            t.elapsed() < within,
            "/readyz not ready={want} within {within:?}: {}",
            r.json
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_within_a_heartbeat_when_the_executor_dies_and_healthz_stays_200() {
    let gw = Gateway::start("[executor]\nheartbeat_ms = 250\n").await;
    let r = readyz(&gw).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["not_ready"], serde_json::json!([]));
    assert_eq!(r.json["models"][0]["state"], "loaded", "{}", r.json);
    let old = executor_pid(&gw).await;
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let (took, body) = until_ready_is(&gw, false, Duration::from_secs(5)).await;
    assert!(took <= Duration::from_millis(250), "503 after {took:?}");
    assert!(
        body["not_ready"]
            .as_array()
            .unwrap()
            .contains(&"executor_not_ready".into()),
        "{body}"
    );
    let (_, body) = until_ready_is(&gw, true, Duration::from_secs(90)).await;
    assert_eq!(body["executor_ready"], true, "{body}");
    assert_ne!(executor_pid(&gw).await, old);
    assert_eq!(gw.good_image().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_executor_misses_heartbeats_turns_readyz_503_and_is_replaced() {
    let gw = Gateway::start("[executor]\nheartbeat_ms = 200\nheartbeat_misses = 5\n").await;
    let old = executor_pid(&gw).await;
    // Alive but silent: the process is there, its heartbeats are not.
    kill(Pid::from_raw(old as i32), Signal::SIGSTOP).unwrap();
    let (took, body) = until_ready_is(&gw, false, Duration::from_secs(5)).await;
    // 503 once one heartbeat is missed (2 intervals of silence), while the
    // link is still up.
    assert!(
        took <= Duration::from_millis(3 * 200 + 100),
        "503 after {took:?}"
    );
    assert!(
        body["not_ready"]
            .as_array()
            .unwrap()
            .contains(&"executor_missed_heartbeat".into()),
        "{body}"
    );
    assert!(
        body["executor_silent_ms"].as_u64().unwrap() >= 400,
        "{body}"
    );
    // After 5 missed heartbeats it is killed and a new one started.
    let (_, body) = until_ready_is(&gw, true, Duration::from_secs(90)).await;
    assert_eq!(body["not_ready"], serde_json::json!([]), "{body}");
    assert_ne!(executor_pid(&gw).await, old);
    let restarts = gw
        .metric(
            "mmgate_worker_restarts_total",
            "reason=\"missed_heartbeats\"",
        )
        .await;
    assert_eq!(restarts, 1.0);
    assert_eq!(gw.good_image().await.status, 200);
}

/// `POST /admin/models/{m}/unload` and `/load`: answered with the new
/// state; an unloaded model's requests get 503 `model_not_loaded` before
/// any work, and /readyz stays 200 (an operator's choice is not a fault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_unloads_and_loads_live_and_its_requests_say_so() {
    let gw = Gateway::start_logged_with("", &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let before = gw.good_image().await;
    assert_eq!(before.status, 200);
    let first = executor_pid(&gw).await;

    let r = post(&gw, "/admin/models/nope/unload").await;
    r.refused(404, "model_not_found");
    let r = gw
        .admin(Method::POST, "/admin/models/open_nsfw/unload", None, None)
        .await;
    r.refused(401, "admin_key_required");

    let r = post(&gw, "/admin/models/open_nsfw/unload").await;
    assert_eq!(r.status, 200, "{}", r.json);
    let model = &r.json["executor"]["models"][0];
    assert_eq!(model["loaded"], false, "{}", r.json);
    assert!(model["runtime"].is_null(), "{}", r.json);
    let refused = gw.good_image().await;
    refused.refused(503, "model_not_loaded");
    let ready = readyz(&gw).await;
    assert_eq!(ready.status, 200, "{}", ready.json);
    assert_eq!(ready.json["models"][0]["state"], "unloaded");
    // The executor that took over loads nothing.
    let second = executor_pid(&gw).await;
    assert_ne!(second, first);

    // Unloading again changes nothing (no new executor).
    let r = post(&gw, "/admin/models/open_nsfw/unload").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(executor_pid(&gw).await, second);

    let r = post(&gw, "/admin/models/open_nsfw/load").await;
    assert_eq!(r.status, 200, "{}", r.json);
    let model = &r.json["executor"]["models"][0];
    assert_eq!(model["loaded"], true, "{}", r.json);
    assert_eq!(model["runtime"]["model"], "open_nsfw", "{}", r.json);
    let after = gw.good_image().await;
    assert_eq!(after.status, 200, "{}", after.json);
    assert_eq!(after.nsfw(), before.nsfw());
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    assert!(log.contains("admin: model unloaded"), "logged");
    assert!(log.contains("admin: model loaded"), "logged");
}

/// `POST /admin/reload` reads the files again: tenants, the pool size and
/// a model's batching take effect live; other changes are named as
/// needing a restart; a bad file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_what_can_change_live_and_a_bad_file_changes_nothing() {
    // The model's spec in a folder of the test's, to change it.
    let models = std::env::temp_dir().join(format!("mmgate-reload-models-{}", std::process::id()));
    std::fs::create_dir_all(&models).unwrap();
    let repo = common::repo();
    let spec = std::fs::read_to_string(repo.join("configs/models/open_nsfw.toml"))
        .unwrap()
        .replace(
            "file = \"../../.deps/models/open-nsfw.onnx\"",
            &format!("file = {:?}", repo.join(".deps/models/open-nsfw.onnx")),
        );
    let write_spec = |delay_us: u32| {
        let text = spec.replace(
            "max_queue_delay_us = 2000",
            &format!("max_queue_delay_us = {delay_us}"),
        );
        assert!(text.contains(&format!("max_queue_delay_us = {delay_us}")));
        std::fs::write(models.join("open_nsfw.toml"), text).unwrap()
    };
    write_spec(2000);
    let first = format!(
        "{}[server]\nmodels_dir = {:?}\n",
        tenant("acme", ""),
        models
    );
    let gw = Gateway::start_with(&first, &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let score_as = |key: &'static str| {
        gw.client
            .post(gw.url("/v1/models/open_nsfw/score"))
            .bearer_auth(key)
            .header("content-type", "image/jpeg")
            .body(fixture("images/coffee.jpg"))
    };
    assert_eq!(common::Reply::of(score_as("key-acme")).await.status, 200);
    common::Reply::of(score_as("key-bolt"))
        .await
        .refused(401, "invalid_api_key");

    // A file that does not validate: refused, nothing changes.
    write_config(&gw.dir, &format!("{first}[workers]\ncount = 0\n"));
    let r = post(&gw, "/admin/reload").await;
    r.refused(422, "config_invalid");

    let pid = executor_pid(&gw).await;
    let next = format!(
        "{first}{}[workers]\ncount = 3\n[http]\nmax_connections = 777\n",
        tenant("bolt", "")
    );
    write_config(&gw.dir, &next);
    let r = post(&gw, "/admin/reload").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        r.json["applied"],
        serde_json::json!(["tenants", "workers.count"])
    );
    assert_eq!(r.json["restart_required"], serde_json::json!(["http"]));
    assert_eq!(r.json["preprocess"]["desired"], 3, "{}", r.json);
    assert_eq!(common::Reply::of(score_as("key-bolt")).await.status, 200);
    // The executor was left alone: its settings did not change.
    assert_eq!(executor_pid(&gw).await, pid);
    gw.wait_children("preprocess-work", 3).await;

    // Reloading the same files again applies nothing.
    let r = post(&gw, "/admin/reload").await;
    assert_eq!(r.json["applied"], serde_json::json!([]), "{}", r.json);
    assert_eq!(
        r.json["restart_required"],
        serde_json::json!([]),
        "{}",
        r.json
    );

    // A live change survives a reload that changes another field.
    let r = gw
        .admin(
            Method::PUT,
            "/admin/models/open_nsfw",
            Some(ADMIN_KEY),
            Some(serde_json::json!({"instances": 1})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    write_spec(1500);
    let r = post(&gw, "/admin/reload").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["applied"], serde_json::json!(["models.open_nsfw"]));
    let m = &r.json["executor"]["models"][0];
    assert_eq!(m["instances"], 1, "the live change was undone: {m}");
    assert_eq!(m["max_queue_delay_us"], 1500, "{m}");

    // A change that cannot be made (a pool past the running max) is
    // refused, but a tenant change in the same files is put in force: a
    // revoked or new key does not wait for the rest.
    let carl = format!(
        "{first}{}{}[workers]\ncount = 10\nmax = 12\n[http]\nmax_connections = 777\n",
        tenant("bolt", ""),
        tenant("carl", "")
    );
    write_config(&gw.dir, &carl);
    let r = post(&gw, "/admin/reload").await;
    let msg = r.refused(422, "config_invalid").to_string();
    assert!(msg.contains("tenants put in force"), "{msg}");
    assert_eq!(common::Reply::of(score_as("key-carl")).await.status, 200);
    let _ = std::fs::remove_dir_all(&models);
}

/// `cpus` pins a pool: every thread of every worker, and of the executor,
/// may run only on the CPUs given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_pinned_to_their_cpus() {
    let allowed = shm::allowed_cpus().unwrap();
    let (w, e) = match allowed.as_slice() {
        [one] => (*one, *one),
        [a, b, ..] => (*b, *a),
        [] => unreachable!(),
    };
    let gw = Gateway::start(&format!(
        "[workers]\ncpus = \"{w}\"\n[executor]\ncpus = \"{e}\"\n"
    ))
    .await;
    assert_eq!(gw.good_image().await.status, 200);
    let threads_on = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .map(|v| v.trim().to_string())
            })
            .collect()
    };
    for (comm, cpu) in [("preprocess-work", w), ("gpu-executor", e)] {
        let pids = gw.children(comm);
        assert!(!pids.is_empty(), "no {comm}");
        for pid in pids {
            let lists = threads_on(pid);
            assert!(lists.len() > 1, "{comm} {pid} has threads: {lists:?}");
            assert!(
                lists.iter().all(|l| *l == cpu.to_string()),
                "{comm} {pid}: {lists:?}, want {cpu}"
            );
        }
    }
}

#[test]
fn a_cpu_list_naming_a_cpu_this_host_lacks_is_refused_at_start() {
    common::deps_check();
    let dir = std::env::temp_dir().join(format!("mmgate-cpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write_config(&dir, "[workers]\ncpus = \"4000\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("MMGATE_ADMIN_LISTEN", "")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "started pinned to CPU 4000");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workers.cpus") && err.contains("4000"),
        "{err}"
    );
}

/// `mmgate tune` measures real trials within its budget, prints its table
/// and pick, and writes the pick as TOML that the config accepts.
#[test]
fn the_tuner_measures_within_its_budget_and_writes_its_pick() {
    common::deps_check();
    let _machine = common::exclusive();
    let dir = std::env::temp_dir().join(format!("mmgate-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write_config(&dir, "");
    let out_toml = dir.join("tuned.toml");
    let images = common::repo().join("tests/fixtures/images");
    let budget = Duration::from_secs(40);
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmgate"))
        .args(["tune", "--config"])
        .arg(&cfg)
        .arg("--inputs")
        .arg(images.join("coffee.jpg"))
        .arg(images.join("coffee_640.jpg"))
        .args([
            "--budget",
            "40s",
            "--trial-seconds",
            "1",
            "--concurrency",
            "4",
        ])
        .arg("--out")
        .arg(&out_toml)
        .output()
        .unwrap();
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Within its budget (and the time to stop the last trial).
    assert!(took < budget + Duration::from_secs(15), "took {took:?}");
    // Progress on stderr, one line per trial; the table on stdout.
    let trials = stderr.lines().filter(|l| l.starts_with("tune [")).count();
    assert!(trials >= 3, "{stderr}");
    assert!(
        stdout.contains("| workers | threads | instances |"),
        "{stdout}"
    );
    let rows = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" | "))
        .count();
    assert!(rows > trials.min(3), "{stdout}");
    assert!(stdout.contains("pick: workers="), "{stdout}");
    assert!(stdout.contains("defaults"), "{stdout}");
    // The TOML names a valid pool, which a config takes.
    let toml = std::fs::read_to_string(&out_toml).unwrap();
    let pool = toml
        .split("[workers]")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    let cfg = write_config(&dir, &format!("[workers]{pool}"));
    let loaded = config::ServerConfig::load(&cfg).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        pool.contains("count = ") && pool.contains("threads = "),
        "{toml}"
    );
    assert!(
        pool.contains(&format!("count = {}\n", loaded.workers.count)),
        "{toml}"
    );
}
