//! Tenants through the real binaries: per-tenant request and sample rates.

mod common;

use common::*;
use futures::StreamExt;

/// A request with `key` scoring `images` (as a multipart form of
/// `images/coffee.jpg`), or the raw video at `video`.
async fn send(gw: &Gateway, key: &str, images: usize, video: Option<&str>) -> Reply {
    let url = gw.url("/v1/models/open_nsfw/score?fps=1");
    let req = gw.client.post(&url).header("x-api-key", key);
    let req = match video {
        Some(name) => req
            .header("content-type", "application/octet-stream")
            .body(std::fs::read(repo().join(".deps/videos").join(name)).unwrap()),
        None => {
            let mut form = reqwest::multipart::Form::new();
            for i in 0..images {
                let part = reqwest::multipart::Part::bytes(fixture("images/coffee.jpg"))
                    .file_name(format!("{i}.jpg"))
                    .mime_str("image/jpeg")
                    .unwrap();
                form = form.part("image", part);
            }
            req.multipart(form)
        }
    };
    Reply::of(req).await
}

fn retry_after(r: &Reply) -> u64 {
    r.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {:?}", r.headers))
}

/// Tenant `b` with no limits, and tenant `a` with `extra_for_a`; the keys
/// are `key-a`, `key-b`.
fn tenants(extra_for_a: &str) -> String {
    tenant("a", extra_for_a) + &tenant("b", "")
}

/// `requests_per_s` with `requests_burst`: the burst passes, the next
/// request gets 429 `rate_limited` with the bucket's `Retry-After`, and
/// another tenant is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_tenants_rate_get_429_with_retry_after() {
    let gw = Gateway::start(&tenants("requests_per_s = 0.25\nrequests_burst = 2")).await;
    for _ in 0..2 {
        let r = send(&gw, "key-a", 1, None).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let r = send(&gw, "key-a", 1, None).await;
    r.refused(429, "rate_limited");
    assert_eq!(r.json["error"]["type"], "quota");
    // One token at 0.25/s is up to 4 s away (less the time the two took).
    let wait = retry_after(&r);
    assert!((1..=4).contains(&wait), "Retry-After {wait}");
    let r = send(&gw, "key-b", 1, None).await;
    assert_eq!(r.status, 200, "tenant b was limited: {}", r.json);
    assert_eq!(
        gw.metric(
            "mmgate_requests_total",
            "code=\"429\",model=\"open_nsfw\",tenant=\"a\""
        )
        .await,
        1.0
    );
}

/// `samples_per_s` counts images: a request takes one token per image, and
/// more images than the burst is 413, since waiting cannot help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_are_counted_per_image() {
    let gw = Gateway::start(&tenants("samples_per_s = 0.2\nsamples_burst = 3")).await;
    // Parts that are not images are refused before they cost a token.
    let mut form = reqwest::multipart::Form::new();
    for i in 0..3 {
        let part =
            reqwest::multipart::Part::bytes(b"not an image".to_vec()).file_name(format!("{i}.txt"));
        form = form.part("image", part);
    }
    let req = gw
        .client
        .post(gw.url("/v1/models/open_nsfw/score"))
        .header("x-api-key", "key-a");
    let r = Reply::of(req.multipart(form)).await;
    r.refused(415, "unsupported_media_type");
    let r = send(&gw, "key-a", 2, None).await;
    assert_eq!(r.status, 200, "{}", r.json);
    // One token left (plus 0.2/s since): two do not fit for a while.
    let r = send(&gw, "key-a", 2, None).await;
    r.refused(429, "rate_limited");
    assert!((1..=5).contains(&retry_after(&r)), "{:?}", r.headers);
    let r = send(&gw, "key-a", 4, None).await;
    r.refused(413, "too_many_images");
    let r = send(&gw, "key-a", 1, None).await;
    assert_eq!(r.status, 200, "one image still fits: {}", r.json);
    let r = send(&gw, "key-b", 2, None).await;
    assert_eq!(r.status, 200, "tenant b was limited: {}", r.json);
}

/// A video's sampled frames are samples too: it needs one token to start,
/// each further frame is charged as it comes, and the frames past the
/// tokens it found are owed, so the tenant's next request waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_videos_sampled_frames_are_charged_as_they_come() {
    let gw = Gateway::start(&tenants("samples_per_s = 0.5\nsamples_burst = 3")).await;
    let r = send(&gw, "key-a", 0, Some("h264.mp4")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let frames = r.json["frames_sampled"].as_u64().unwrap();
    assert!(frames >= 6, "{frames} frames sampled");
    // The bucket owes about frames - 3 tokens; one more image needs
    // (frames - 2) / 0.5 s, less what refilled while the video ran. Without
    // the debt it would be at most 2 s.
    let r = send(&gw, "key-a", 1, None).await;
    r.refused(429, "rate_limited");
    let wait = retry_after(&r);
    assert!(
        wait > 3 && wait <= 2 * (frames - 2),
        "Retry-After {wait} after a video of {frames} frames"
    );
    let r = send(&gw, "key-b", 0, Some("h264.mp4")).await;
    assert_eq!(r.status, 200, "tenant b was limited: {}", r.json);
}

/// Requests with a 50 ms deadline behind a long queue get 504
/// `deadline_exceeded` at their deadline; their work is dropped before
/// decode (counted in `mmgate_dropped_total`), and no worker or executor
/// log line shows their ids. The tenant's `deadline_ms` applies when the
/// header is absent; a bad header is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_deadline_is_dropped_and_answered_504() {
    let gw = Gateway::start_logged(&format!(
        "[workers]\ncount = 1\nthreads = 1\n{}",
        tenants("deadline_ms = 50")
    ))
    .await;
    let url = gw.url("/v1/models/open_nsfw/score");
    let big = fixture("images/astronaut_1536.jpg");
    // A queue of 48 large images on one worker thread, 24 of each tenant
    // (fair queuing puts each tenant's late requests behind its own
    // backlog): well over 50 ms. Tenant a's backlog overrides its 50 ms.
    let backlog: Vec<_> = (0..48)
        .map(|i| {
            let req = gw
                .client
                .post(&url)
                .header("x-api-key", if i % 2 == 0 { "key-a" } else { "key-b" })
                .header("x-request-timeout", "60000")
                .header("x-request-id", format!("backlog-{i}"))
                .body(big.clone());
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let late = |i: usize, header: bool| {
        let mut req = gw
            .client
            .post(&url)
            .header("x-api-key", if header { "key-b" } else { "key-a" })
            .header("x-request-id", format!("late-{i}"))
            .body(big.clone());
        if header {
            req = req.header("x-request-timeout", "50");
        }
        async move {
            let t = std::time::Instant::now();
            let r = Reply::of(req).await;
            (r, t.elapsed())
        }
    };
    // Five by header (tenant b has no deadline of its own), five by
    // tenant a's deadline_ms.
    let answers = futures::future::join_all((0..10).map(|i| late(i, i < 5))).await;
    for (r, took) in &answers {
        r.refused(504, "deadline_exceeded");
        assert!(
            *took < std::time::Duration::from_millis(1000),
            "504 after {took:?}"
        );
    }
    let mut took: Vec<_> = answers.iter().map(|(_, t)| t.as_secs_f64() * 1e3).collect();
    took.sort_by(f64::total_cmp);
    println!(
        "504 after {:.1} ms (median), {:.1} ms (max)",
        took[5], took[9]
    );
    for h in backlog {
        assert_eq!(h.await.unwrap().unwrap(), 200);
    }
    let dropped = gw
        .metric("mmgate_dropped_total", "reason=\"deadline\"")
        .await;
    assert_eq!(dropped, 10.0, "dropped counter");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    // Lines of a worker or the executor that carry `id` (as a whole value).
    let child_lines = |id: &str| -> Vec<&str> {
        let quoted = format!("\"{id}\"");
        log.lines()
            .filter(|l| l.contains(&quoted) || l.contains(&format!("={id} ")))
            .filter(|l| l.contains("preprocess_worker") || l.contains("gpu_executor"))
            .collect()
    };
    assert!(
        !child_lines("backlog-0").is_empty(),
        "the children log request ids:\n{log}"
    );
    for i in 0..10 {
        let id = format!("late-{i}");
        let lines = child_lines(&id);
        assert!(
            lines.is_empty(),
            "{id} reached a worker or the executor: {lines:#?}"
        );
    }
    let r = Reply::of(
        gw.client
            .post(&url)
            .header("x-api-key", "key-b")
            .header("x-request-timeout", "soon")
            .body(big.clone()),
    )
    .await;
    r.refused(400, "bad_request");
}

/// SIGHUP re-reads the tenants: a new tenant's key works, a removed one's
/// stops, requests in flight finish; a bad file is refused, logged, and
/// leaves the tenants in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_tenants_and_a_bad_file_changes_nothing() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let gw = Gateway::start_logged(&tenants("")).await;
    let hup = || kill(Pid::from_raw(gw.pid() as i32), Signal::SIGHUP).unwrap();
    let status = |key: &'static str| {
        let req = gw
            .client
            .post(gw.url("/v1/models/open_nsfw/score"))
            .header("x-api-key", key)
            .body(fixture("images/coffee.jpg"));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("key-c").await, 401);
    // Tenant b goes, tenant c comes; a request is in flight meanwhile.
    let in_flight = tokio::spawn(status("key-b"));
    write_config(
        &gw.dir,
        &format!(
            "[[tenants]]\nname = \"a\"\nkey_hashes = [{:?}]\n\
             [[tenants]]\nname = \"c\"\nkey_hashes = [{:?}]\n",
            config::key_hash("key-a"),
            config::key_hash("key-c"),
        ),
    );
    hup();
    let t = std::time::Instant::now();
    while status("key-c").await != 200 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "key-c never admitted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(matches!(in_flight.await.unwrap(), 200 | 401));
    assert_eq!(status("key-b").await, 401, "tenant b was removed");
    assert_eq!(status("key-a").await, 200);
    // A file that does not validate is refused; c and a stay.
    write_config(
        &gw.dir,
        "[[tenants]]\nname = \"x\"\nkeys = [\"plaintext\"]\n",
    );
    hup();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status("key-c").await, 200);
    assert_eq!(status("key-a").await, 200);
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    assert!(
        log.contains("config reload refused") && log.contains("plaintext `keys` are not accepted"),
        "the refusal is not logged:\n{log}"
    );
    assert!(!log.contains("\"plaintext\""), "the refused key was logged");
}

/// A models folder with `configs/models/open_nsfw.toml` and a copy of it
/// named `open_nsfw_canary`: the same ONNX file under a second name.
fn models_with_a_canary() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mmgate-canary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = std::fs::read_to_string(repo().join("configs/models/open_nsfw.toml")).unwrap();
    let onnx = repo().join(".deps/models/open-nsfw.onnx");
    let spec = spec.replace(
        "file = \"../../.deps/models/open-nsfw.onnx\"",
        &format!("file = {onnx:?}"),
    );
    assert!(
        spec.contains(&format!("{onnx:?}")),
        "the spec's file line moved"
    );
    std::fs::write(dir.join("open_nsfw.toml"), &spec).unwrap();
    let canary = spec.replace("name = \"open_nsfw\"", "name = \"open_nsfw_canary\"");
    std::fs::write(dir.join("open_nsfw_canary.toml"), canary).unwrap();
    dir
}

/// A 90/10 route: over 2,000 requests the canary serves 10% ± 3% of them
/// (smooth weighted round robin: exactly 10%), every answer names the
/// model that served it, and so do the metrics. A tenant without the
/// route cannot call the alias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_route_sends_its_share_to_the_canary() {
    let models = models_with_a_canary();
    let gw = Gateway::start(&format!(
        "[server]\nmodels_dir = {models:?}\n{}",
        tenants(
            "routes = { moderation = [{ model = \"open_nsfw\", weight = 90 }, \
             { model = \"open_nsfw_canary\", weight = 10 }] }"
        )
    ))
    .await;
    let url = gw.url("/v1/models/moderation/score");
    let body = fixture("images/no_time_for_that_tiny.gif");
    let served: Vec<String> = futures::stream::iter(0..2000)
        .map(|_| {
            let req = gw
                .client
                .post(&url)
                .header("x-api-key", "key-a")
                .body(body.clone());
            async move {
                let r = Reply::of(req).await;
                assert_eq!(r.status, 200, "{}", r.json);
                r.json["model"].as_str().unwrap().to_string()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let canary = served.iter().filter(|m| *m == "open_nsfw_canary").count();
    let main = served.iter().filter(|m| *m == "open_nsfw").count();
    assert_eq!(
        canary + main,
        2000,
        "every answer names a model of the route"
    );
    assert!(
        (140..=260).contains(&canary),
        "the canary served {canary} of 2000"
    );
    println!("the canary served {canary} of 2000");
    let counted = |m: &'static str| {
        let filter = format!("code=\"200\",model=\"{m}\",tenant=\"a\"");
        let gw = &gw;
        async move { gw.metric("mmgate_requests_total", &filter).await }
    };
    assert_eq!(counted("open_nsfw_canary").await, canary as f64);
    assert_eq!(counted("open_nsfw").await, main as f64);
    let r = Reply::of(
        gw.client
            .post(&url)
            .header("x-api-key", "key-b")
            .body(body.clone()),
    )
    .await;
    r.refused(404, "model_not_found");
    let _ = std::fs::remove_dir_all(models);
}
