//! The admin API: its own listener and key, live pool sizing under load.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Gateway, fixture, tenant};
use reqwest::Method;
use serde_json::json;

const ADMIN_KEY: &str = "admin-secret-7f3a9c";

fn pids(v: &serde_json::Value) -> BTreeSet<u32> {
    v["preprocess"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_only_its_own_key_on_its_own_port_and_logs_no_key() {
    let gw =
        Gateway::start_logged_with(&tenant("acme", ""), &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let admin = gw.admin_addr.clone().unwrap();
    assert_ne!(admin, gw.addr, "the admin API has its own port");
    let get = |key| gw.admin(Method::GET, "/admin/pools", key, None);
    for key in [None, Some("wrong"), Some("key-acme"), Some("")] {
        let r = get(key).await;
        r.refused(401, "admin_key_required");
    }
    let r = get(Some(ADMIN_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["preprocess"]["desired"], 2, "{}", r.json);
    assert_eq!(r.json["executor"]["ready"], true, "{}", r.json);
    // Not on the public listener, whatever the key.
    let public = gw
        .client
        .get(gw.url("/admin/pools"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    // A tenant key changes nothing either.
    let r = gw
        .admin(
            Method::PUT,
            "/admin/pools/preprocess",
            Some("key-acme"),
            Some(json!({"workers": 3})),
        )
        .await;
    r.refused(401, "admin_key_required");
    let r = gw
        .admin(
            Method::PUT,
            "/admin/pools/preprocess",
            Some(ADMIN_KEY),
            Some(json!({"workers": 3})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["preprocess"]["desired"], 3);
    let metrics = gw
        .admin(Method::GET, "/metrics", Some(ADMIN_KEY), None)
        .await;
    let text = metrics.json.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("mmgate_children_ready"),
        "metrics on the admin listener"
    );
    // Children decode hostile input: the key is not in their environment.
    // (Only children past their exec: a process still between fork and
    // exec, like the third worker just asked for, shows the gateway's own
    // environment.)
    let mut kids = gw.children("preprocess-work");
    kids.extend(gw.children("gpu-executor"));
    assert!(kids.len() >= 3, "{kids:?}");
    for pid in kids {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        assert!(!env.contains(ADMIN_KEY), "child {pid} has the admin key");
    }
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    assert!(
        log.contains("admin: preprocess pool resized"),
        "the change is logged"
    );
    for (what, key) in [("admin", ADMIN_KEY), ("tenant", "key-acme")] {
        assert!(!log.contains(key), "the {what} key is in the log");
        assert!(!text.contains(key), "the {what} key is in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_changes_are_refused_and_bad_changes_are_400() {
    let gw = Gateway::start("").await;
    let r = gw.admin(Method::GET, "/admin/pools", None, None).await;
    assert_eq!(r.status, 200, "reads are open without a key: {}", r.json);
    let r = gw
        .admin(
            Method::PUT,
            "/admin/pools/preprocess",
            None,
            Some(json!({"workers": 3})),
        )
        .await;
    r.refused(403, "admin_disabled");
    drop(gw);

    let gw = Gateway::start_with("", &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let put = |path: &'static str, body| gw.admin(Method::PUT, path, Some(ADMIN_KEY), Some(body));
    for body in [
        json!({"workers": 0}),
        json!({"workers": 9}),
        json!({"threads": 0}),
        json!({"workers": 2, "colour": "red"}),
        json!({}),
    ] {
        let r = put("/admin/pools/preprocess", body.clone()).await;
        r.refused(400, "bad_request");
    }
    for body in [json!({"instances": 0}), json!({"max_batch": 0}), json!({})] {
        let r = put("/admin/models/open_nsfw", body.clone()).await;
        r.refused(400, "bad_request");
    }
    let r = put("/admin/models/nope", json!({"instances": 1})).await;
    r.refused(404, "model_not_found");
    // Nothing changed.
    let r = gw
        .admin(Method::GET, "/admin/pools", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(r.json["preprocess"]["desired"], 2);
    assert_eq!(
        r.json["executor"]["models"][0]["instances"], 2,
        "{}",
        r.json
    );
    assert_eq!(r.json["executor"]["restarts"], 0);
}

/// Keeps `clients` sending the good image until stopped; counts answers
/// and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Sends the good JPEG.
    fn start(gw: &Gateway, clients: usize) -> Load {
        Self::sending(gw, clients, fixture("images/coffee.jpg"), "image/jpeg")
    }

    fn sending(gw: &Gateway, clients: usize, body: Vec<u8>, ctype: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let (client, url, body) = (
                    gw.client.clone(),
                    gw.url("/v1/models/open_nsfw/score"),
                    body.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = client
                            .post(&url)
                            .header("content-type", ctype)
                            .body(body.clone())
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                let s = r.status();
                                let t = r.text().await.unwrap_or_default();
                                failed.lock().unwrap().push(format!("{s}: {t}"));
                            }
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Resizes the preprocess pool and waits until `ps` and `/admin/pools`
/// agree on `n` ready workers; returns how long that took.
async fn resize_workers(gw: &Gateway, body: serde_json::Value, n: usize) -> Duration {
    let t = Instant::now();
    let r = gw
        .admin(
            Method::PUT,
            "/admin/pools/preprocess",
            Some(ADMIN_KEY),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    loop {
        let r = gw
            .admin(Method::GET, "/admin/pools", Some(ADMIN_KEY), None)
            .await;
        let listed = pids(&r.json);
        let ps: BTreeSet<u32> = gw.children("preprocess-work").into_iter().collect();
        let p = &r.json["preprocess"];
        if p["ready"] == n && p["alive"] == n && listed == ps && ps.len() == n {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pool never reached {n}: ps {ps:?}, admin {}",
            r.json
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_resize_live_under_load_and_no_request_fails() {
    let gw = Gateway::start_with("", &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let load = Load::start(&gw, 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut took = Vec::new();
    for (body, n) in [
        (json!({"workers": 6}), 6),
        (json!({"workers": 1}), 1),
        (json!({"workers": 2, "threads": 2}), 2),
        (json!({"threads": 1}), 2),
    ] {
        took.push(resize_workers(&gw, body, n).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("preprocess resizes agreed with ps after {took:?}");
    assert!(
        took.iter().all(|t| *t < Duration::from_secs(2)),
        "ps and /admin/pools agree within 2 s: {took:?}"
    );
    let r = gw
        .admin(Method::GET, "/admin/pools", Some(ADMIN_KEY), None)
        .await;
    let threads: Vec<_> = r.json["preprocess"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 1], "{}", r.json);

    let old_exec = gw.children("gpu-executor");
    for instances in [1, 2] {
        let r = gw
            .admin(
                Method::PUT,
                "/admin/models/open_nsfw",
                Some(ADMIN_KEY),
                Some(json!({"instances": instances, "max_queue_delay_us": 1500})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        let m = &r.json["executor"]["models"][0];
        assert_eq!(m["instances"], instances, "{}", r.json);
        assert_eq!(m["max_queue_delay_us"], 1500, "{}", r.json);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, failed) = load.finish().await;
    println!("{ok} requests answered 200 during the resizes");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "the load ran ({ok})");
    // The replaced executors are gone, one serves, and its layout shows.
    gw.wait_children("gpu-executor", 1).await;
    let now = gw.children("gpu-executor");
    assert!(!old_exec.contains(&now[0]), "a new executor serves");
    let m = gw.get("/v1/models/open_nsfw").await;
    assert_eq!(m.json["instances"]["count"], 2, "{}", m.json);
    assert_eq!(m.json["batching"]["max_queue_delay_us"], 1500, "{}", m.json);
    let leased = gw.metric("mmgate_shm_slots", "state=\"leased\"").await;
    assert_eq!(leased, 0.0, "every slot is free again");
    assert_eq!(
        gw.metric("mmgate_worker_restarts_total", "reason=\"retired\"")
            .await,
        8.0,
        "6→1 retires 5; 1→2 with 2 threads retires 1; back to 1 thread retires 2; executors are not counted",
    );
}

/// `desired` of the preprocess pool, from the admin API.
async fn desired(gw: &Gateway) -> u64 {
    let r = gw.admin(Method::GET, "/admin/pools", None, None).await;
    r.json["preprocess"]["desired"].as_u64().unwrap()
}

/// Polls `desired` until `until` holds or `within` passes; returns each
/// change with when it was seen.
async fn follow(
    gw: &Gateway,
    from: u64,
    within: Duration,
    until: impl Fn(u64) -> bool,
) -> Vec<(Instant, u64)> {
    let t = Instant::now();
    let (mut last, mut changes) = (from, Vec::new());
    while t.elapsed() < within {
        let d = desired(gw).await;
        if d != last {
            changes.push((Instant::now(), d));
            last = d;
        }
        if until(d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    changes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_autoscales_to_max_under_load_and_back_to_min_one_step_per_cooldown() {
    let gw = Gateway::start(
        "[workers]\ncount = 1\nmin = 1\nmax = 3\nautoscale = true\ncooldown_ms = 1000\nscale_up_queue_ms = 50\n",
    )
    .await;
    // Large PNGs: decoding, not the model, is the bottleneck.
    let load = Load::sending(&gw, 10, big_png(), "image/png");
    let up = follow(&gw, 1, Duration::from_secs(20), |d| d == 3).await;
    let (ok, failed) = load.finish().await;
    assert!(failed.is_empty(), "{failed:?}");
    let down = follow(&gw, 3, Duration::from_secs(20), |d| d == 1).await;
    println!("{ok} answered; up {up:?}, down {down:?}");
    let values = |v: &[(Instant, u64)]| v.iter().map(|c| c.1).collect::<Vec<_>>();
    assert_eq!(values(&up), [2, 3], "one step at a time up to max");
    assert_eq!(values(&down), [2, 1], "and back down to min");
    for pair in up.windows(2).chain(down.windows(2)) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(900),
            "two changes {gap:?} apart, under the 1 s cooldown"
        );
    }
    // The workers follow `desired`.
    gw.wait_children("preprocess-work", 1).await;
    let text = gw.metrics().await;
    assert!(
        text.contains("mmgate_autoscale_changes_total{direction=\"up\",pool=\"preprocess\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("mmgate_autoscale_changes_total{direction=\"down\",pool=\"preprocess\"} 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_after_n_jobs_without_failing_a_request_and_metrics_add_up() {
    let gw = Gateway::start("[workers]\nrecycle_after_jobs = 10\n").await;
    let first: BTreeSet<u32> = gw.children("preprocess-work").into_iter().collect();
    let load = Load::start(&gw, 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed) = load.finish().await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok >= 40, "enough jobs to recycle: {ok}");
    gw.wait_children("preprocess-work", 2).await;
    // A recycled worker takes jobs until its replacement is ready, so it may
    // run somewhat more than 10; at least a third of the expected count.
    let retired = gw
        .metric("mmgate_worker_restarts_total", "reason=\"retired\"")
        .await;
    assert!(
        retired >= (ok / 30).max(3) as f64,
        "{ok} jobs at 10 per worker, {retired} retired"
    );
    let now: BTreeSet<u32> = gw.children("preprocess-work").into_iter().collect();
    assert!(
        first.is_disjoint(&now),
        "{first:?} were replaced by {now:?}"
    );
    // Every request is counted once; queues and slots are empty again.
    assert_eq!(gw.metric("mmgate_requests_total", "").await, ok as f64);
    assert_eq!(gw.metric("mmgate_shm_slots", "state=\"leased\"").await, 0.0);
    assert_eq!(
        gw.metric("mmgate_queue_depth", "stage=\"preprocess\"")
            .await,
        0.0
    );
    for pool in ["gateway", "preprocess", "executor"] {
        let filter = format!("pool=\"{pool}\"");
        let cpu = gw.metric("mmgate_process_cpu_seconds_total", &filter).await;
        let rss = gw.metric("mmgate_process_resident_bytes", &filter).await;
        assert!(cpu > 0.0 && rss > 1e6, "{pool}: cpu {cpu} s, rss {rss} B");
    }
    let fill = gw.metric("mmgate_batch_fill_ratio_count", "").await;
    assert_eq!(fill, ok as f64, "one fill observation per sample");
}

/// A 2400² RGB PNG: cheap to send, some 30 ms to decode.
fn big_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(2400, 2400, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x ^ y) % 239) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Work nobody waits for any more is dropped before decode; it is no job
/// of the worker's, so it neither brings a recycling closer nor counts as
/// busy (a client that sends and hangs up cannot force worker restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_work_does_not_count_toward_recycling() {
    let gw = Gateway::start("[workers]\ncount = 1\nthreads = 1\nrecycle_after_jobs = 5\n").await;
    let first = gw.children("preprocess-work");
    let png = big_png();
    let send_png = || {
        gw.client
            .post(gw.url("/v1/models/open_nsfw/score"))
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
    };
    // Two slow decodes hold the only thread; eight requests with a 40 ms
    // deadline queue behind them and expire there.
    let (a, b) = (send_png(), send_png());
    let slow = tokio::spawn(async move {
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        (a.status().as_u16(), b.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let expiring = (0..8).map(|_| {
        gw.client
            .post(gw.url("/v1/models/open_nsfw/score"))
            .header("content-type", "image/jpeg")
            .header("x-request-timeout", "40")
            .body(fixture("images/coffee.jpg"))
            .send()
    });
    for r in futures::future::join_all(expiring).await {
        assert_eq!(r.unwrap().status(), 504);
    }
    assert_eq!(slow.await.unwrap(), (200, 200));
    // The expired work is dropped as the thread comes to it (before
    // decode, or, for one taken just before its deadline, before inference).
    let t = Instant::now();
    while gw.metric("mmgate_dropped_total", "").await < 8.0 {
        assert!(t.elapsed() < Duration::from_secs(3), "not all dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retired = gw
        .metric("mmgate_worker_restarts_total", "reason=\"retired\"")
        .await;
    assert_eq!(
        retired, 0.0,
        "under 5 jobs run, the rest dropped: no recycling"
    );
    assert_eq!(gw.children("preprocess-work"), first);
}
