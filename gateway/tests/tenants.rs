//! Tenants through the real binaries: per-tenant request and sample rates.

mod common;

use common::*;

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
    Reply::read(req.send().await.unwrap()).await
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
    format!(
        "[[tenants]]\nname = \"a\"\nkey_hashes = [{:?}]\n{extra_for_a}\n\
         [[tenants]]\nname = \"b\"\nkey_hashes = [{:?}]\n",
        config::key_hash("key-a"),
        config::key_hash("key-b"),
    )
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
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.json);
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
    let r = send(&gw, "key-a", 2, None).await;
    assert_eq!(r.status, 200, "{}", r.json);
    // One token left (plus 0.2/s since): two do not fit for a while.
    let r = send(&gw, "key-a", 2, None).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.json);
    assert!((1..=5).contains(&retry_after(&r)), "{:?}", r.headers);
    let r = send(&gw, "key-a", 4, None).await;
    assert_eq!((r.status, r.code()), (413, "too_many_images"), "{}", r.json);
    let r = send(&gw, "key-a", 1, None).await;
    assert_eq!(r.status, 200, "one image still fits: {}", r.json);
    let r = send(&gw, "key-b", 2, None).await;
    assert_eq!(r.status, 200, "tenant b was limited: {}", r.json);
}

/// A video's sampled frames are samples too: it needs one token to start,
/// and the frames past the tokens it found are owed, so the tenant's next
/// request waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_videos_sampled_frames_are_charged_after_it_is_scored() {
    let gw = Gateway::start(&tenants("samples_per_s = 0.5\nsamples_burst = 3")).await;
    let r = send(&gw, "key-a", 0, Some("h264.mp4")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let frames = r.json["frames_sampled"].as_u64().unwrap();
    assert!(frames >= 6, "{frames} frames sampled");
    // The bucket owes about frames - 3 tokens; one more image needs
    // (frames - 2) / 0.5 s, less what refilled while the video ran. Without
    // the debt it would be at most 2 s.
    let r = send(&gw, "key-a", 1, None).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.json);
    let wait = retry_after(&r);
    assert!(
        wait > 3 && wait <= 2 * (frames - 2),
        "Retry-After {wait} after a video of {frames} frames"
    );
    let r = send(&gw, "key-b", 0, Some("h264.mp4")).await;
    assert_eq!(r.status, 200, "tenant b was limited: {}", r.json);
}
