//! The dashboard in a real browser: headless Chromium (Debian's), driven by
//! playwright-core (`tests/ui/dashboard.mjs`), opens `/ui` on the admin
//! listener, resizes the preprocess pool with its button, scores a photo in
//! the playground, and reads the score off the page. The screenshot is
//! kept in `test-artifacts/dashboard.png`.

mod common;

use std::time::Duration;

use common::{Gateway, repo};
use reqwest::Method;

const ADMIN_KEY: &str = "admin-secret-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_resizes_the_pool_and_scores_a_photo_in_chromium() {
    let playwright = repo().join(".deps/npm/playwright-core");
    let chromium = std::path::Path::new("/usr/bin/chromium");
    assert!(
        playwright.join("package.json").is_file() && chromium.is_file(),
        "playwright-core or chromium is missing: run `bash scripts/setup.sh test` (or `make test`)"
    );
    let gw = Gateway::start_with("", &[("MMGATE_ADMIN_KEY", ADMIN_KEY)]).await;
    let admin = gw.admin_addr.clone().unwrap();
    // The page is served without a key; its calls need one.
    let page = gw
        .client
        .get(format!("http://{admin}/ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("/ui/vendor/uPlot.iife.min.js")
    );
    let license = gw
        .client
        .get(format!("http://{admin}/ui/vendor/LICENSE"))
        .send()
        .await
        .unwrap();
    assert!(
        license.text().await.unwrap().contains("MIT"),
        "uPlot's licence"
    );

    let photo = repo().join("tests/fixtures/images/coffee.jpg");
    let expected = gw.good_image().await;
    assert_eq!(expected.status, 200);
    let artifacts = repo().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(repo().join("tests/ui/dashboard.mjs"))
            .env("PLAYWRIGHT_CORE", &playwright)
            .env("CHROMIUM", chromium)
            .env("UI_URL", format!("http://{admin}/ui"))
            .env("ADMIN_KEY", ADMIN_KEY)
            .env("PHOTO", &photo)
            .env("SCREENSHOT", &shot)
            .env("WORKERS_TARGET", "3")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser test ran over 120 s")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(seen["page_errors"], serde_json::json!([]), "{seen}");
    // The button resized the pool: the page, the API and `ps` agree.
    assert_eq!(seen["workers_desired"], 3, "{seen}");
    assert_eq!(seen["workers_ready"], 3, "{seen}");
    let pools = gw
        .admin(Method::GET, "/admin/pools", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(pools.json["preprocess"]["desired"], 3, "{}", pools.json);
    gw.wait_children("preprocess-work", 3).await;
    // The score on the page is the gateway's score for that photo.
    let label = seen["label"].as_str().unwrap();
    let want = expected.json["results"][0]["scores"][label]
        .as_f64()
        .unwrap_or_else(|| panic!("no {label} in {}", expected.json));
    let got = seen["score"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "page says {got}, API {want}");
    // The playground's request went through the real path, as `admin`.
    let by_admin = gw.metric("mmgate_requests_total", "tenant=\"admin\"").await;
    assert_eq!(by_admin, 1.0);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
