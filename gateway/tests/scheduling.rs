//! Scheduling through the real binaries: priority classes, fair shares
//! between tenants of a class, degradation before rejection, and the
//! per-tenant body limit. Each test queues large images on a single worker
//! thread, so the preprocess queue builds up for a few hundred ms.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Tenant `name` of class `class`, with key `key-<name>`.
fn classed(name: &str, class: &str, extra: &str) -> String {
    tenant(name, &format!("class = {class:?}\n{extra}"))
}

const ONE_THREAD: &str = "[workers]\ncount = 1\nthreads = 1\n";

fn image(gw: &Gateway, tenant: &str, id: String) -> reqwest::RequestBuilder {
    gw.client
        .post(gw.url("/v1/models/open_nsfw/score"))
        .header("x-api-key", format!("key-{tenant}"))
        .header("x-request-id", id)
        .body(fixture("images/astronaut_1536.jpg"))
}

/// Sends `n` large images as `tenant` at once; each task gives its status
/// and when it was answered.
fn flood(gw: &Gateway, tenant: &str, n: usize) -> Vec<tokio::task::JoinHandle<(u16, Instant)>> {
    (0..n)
        .map(|i| {
            let req = image(gw, tenant, format!("{tenant}-{i}"));
            tokio::spawn(async move {
                let status = req.send().await.unwrap().status().as_u16();
                (status, Instant::now())
            })
        })
        .collect()
}

/// Sends one image as `tenant` once `flooder`'s 48 are queued, and asserts
/// that at most a third of the flood still unanswered when it was sent
/// was answered before it (those already decoded or in a worker may
/// finish first; in FIFO order all would).
async fn overtaken_by(gw: &Gateway, flooder: &str, tenant: &str) {
    let backlog = flood(gw, flooder, 48);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = Instant::now();
    let r = Reply::of(image(gw, tenant, format!("{tenant}-late"))).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let at = Instant::now();
    let (mut pending, mut first) = (0, 0);
    for h in backlog {
        let (status, done) = h.await.unwrap();
        assert_eq!(status, 200);
        pending += usize::from(done > sent);
        first += usize::from(done > sent && done < at);
    }
    println!("{first} of the {pending} {flooder} requests pending were answered before {tenant}'s");
    assert!(
        pending >= 16,
        "the flood was not queued long enough: {pending} pending"
    );
    assert!(
        first <= pending / 3,
        "{first} of {pending} were answered first"
    );
}

/// Strict class order: a `critical` request sent after 48 `batch` ones
/// were queued is answered before most of those still pending (in FIFO
/// order it would be last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_work_overtakes_queued_batch_work() {
    let gw = Gateway::start(&format!(
        "{ONE_THREAD}[scheduling]\nshed_batch_after_ms = 0\n{}{}",
        classed("bulk", "batch", ""),
        classed("vip", "critical", ""),
    ))
    .await;
    overtaken_by(&gw, "bulk", "vip").await;
}

/// Fair shares within a class: tenant b's request, sent after tenant a
/// queued 48, is answered before most of a's still pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_delay_another_of_its_class() {
    let gw = Gateway::start(&format!(
        "{ONE_THREAD}{}{}",
        classed("a", "standard", ""),
        classed("b", "standard", ""),
    ))
    .await;
    overtaken_by(&gw, "a", "b").await;
}

/// Over the queue-delay thresholds: a `batch` request is shed with 503
/// `load_shed` and `Retry-After`; a `standard` video is sampled from
/// keyframes at half the rate and says so in `degraded`; a `critical`
/// video is sampled as asked. The counters say what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_batch_is_shed_and_standard_videos_are_degraded() {
    let gw = Gateway::start(&format!(
        "{ONE_THREAD}[scheduling]\nshed_batch_after_ms = 100\nsparse_video_after_ms = 100\nkeyframes_video_after_ms = 100\n{}{}{}",
        classed("std", "standard", ""),
        classed("bulk", "batch", ""),
        classed("vip", "critical", ""),
    ))
    .await;
    let video = std::fs::read(repo().join(".deps/videos/h264.mp4")).unwrap();
    let send_video = |tenant: &str| {
        gw.client
            .post(gw.url("/v1/models/open_nsfw/score?fps=2"))
            .header("x-api-key", format!("key-{tenant}"))
            .header("content-type", "application/octet-stream")
            .body(video.clone())
    };
    // Unloaded: no degradation.
    let calm = Reply::of(send_video("std")).await;
    assert_eq!(calm.status, 200, "{}", calm.json);
    assert!(calm.json.get("degraded").is_none(), "{}", calm.json);

    let backlog = flood(&gw, "std", 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = Reply::of(image(&gw, "bulk", "bulk-0".into())).await;
    shed.refused(503, "load_shed");
    assert_eq!(shed.headers["retry-after"], "1");
    let (degraded, vip) = tokio::join!(Reply::of(send_video("std")), Reply::of(send_video("vip")));
    assert_eq!(degraded.status, 200, "{}", degraded.json);
    let d = &degraded.json["degraded"];
    assert_eq!(d["reason"], "queue_delay", "{}", degraded.json);
    assert_eq!(d["sampling"], "keyframes_only");
    assert_eq!(
        (d["requested"]["fps"].as_f64(), d["used"]["fps"].as_f64()),
        (Some(2.0), Some(1.0))
    );
    assert_eq!(d["used"]["keyframes_only"], true);
    assert!(d["queue_delay_ms"].as_u64().unwrap() > 100, "{d}");
    let sampled = |r: &Reply| r.json["frames_sampled"].as_u64().unwrap();
    assert!(
        sampled(&degraded) < sampled(&calm),
        "{} vs {}",
        degraded.json,
        calm.json
    );
    assert_eq!(vip.status, 200, "{}", vip.json);
    assert!(
        vip.json.get("degraded").is_none(),
        "critical was degraded: {}",
        vip.json
    );
    assert_eq!(sampled(&vip), sampled(&calm));
    for h in backlog {
        assert_eq!(h.await.unwrap().0, 200);
    }
    let degraded_total = |labels: &'static str| gw.metric("mmgate_degraded_total", labels);
    assert_eq!(degraded_total("action=\"shed\",class=\"batch\"").await, 1.0);
    assert_eq!(
        degraded_total("action=\"keyframes_video\",class=\"standard\"").await,
        1.0
    );
    // Calm again: batch work is served.
    let r = Reply::of(image(&gw, "bulk", "bulk-1".into())).await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// A tenant's `max_body_bytes` lowers the server's body limit for it only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_body_limit_applies_to_it_only() {
    let gw = Gateway::start(&format!(
        "{}{}",
        classed("small", "standard", "max_body_bytes = 100000"),
        classed("big", "standard", ""),
    ))
    .await;
    // A raw body, and the same image in a form.
    let r = Reply::of(image(&gw, "small", "small-raw".into())).await;
    let message = r.refused(413, "payload_too_large");
    assert!(message.contains("tenant's max_body_bytes"), "{message}");
    let part = reqwest::multipart::Part::bytes(fixture("images/astronaut_1536.jpg"))
        .file_name("a.jpg")
        .mime_str("image/jpeg")
        .unwrap();
    let form = reqwest::multipart::Form::new().part("image", part);
    let req = gw
        .client
        .post(gw.url("/v1/models/open_nsfw/score"))
        .header("x-api-key", "key-small");
    let r = Reply::of(req.multipart(form)).await;
    let message = r.refused(413, "payload_too_large");
    assert!(message.contains("tenant's max_body_bytes"), "{message}");
    let r = Reply::of(image(&gw, "big", "big-raw".into())).await;
    assert_eq!(r.status, 200, "{}", r.json);
}
