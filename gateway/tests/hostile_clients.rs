//! Clients that attack the HTTP layer rather than the decoders: slow or
//! half-sent heads, idle and surplus connections, silent uploads, answers
//! nobody reads, oversized echoes. Each may cost only its own connection.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST_HTTP: &str = "[http]\nheader_read_timeout_ms = 1000\nbody_idle_timeout_ms = 1000\n";

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(&gw.addr).await.expect("connect")
}

/// Reads until EOF or error; what was read, and how long until the end.
async fn read_to_end(s: &mut TcpStream, within: Duration) -> (String, Option<Duration>) {
    let t = Instant::now();
    let mut buf = Vec::new();
    let end = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    (
        String::from_utf8_lossy(&buf).into_owned(),
        end.ok().map(|()| t.elapsed()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_cut_off_at_the_header_timeout() {
    let gw = Gateway::start(FAST_HTTP).await;
    let mut s = connect(&gw).await;
    let head = b"POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let t = Instant::now();
    // One byte every 200 ms, forever: only the header timeout ends it.
    let mut closed = None;
    for (i, b) in head.iter().chain(std::iter::repeat(&b'a')).enumerate() {
        if s.write_all(&[*b]).await.is_err() {
            closed = Some(t.elapsed());
            break;
        }
        if i > 40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if t.elapsed() > Duration::from_secs(6) {
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
        {
            closed = Some(t.elapsed());
            break;
        }
    }
    let closed = closed.expect("a slowloris head was held open for 6 s");
    assert!(
        closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    // Everyone else is served meanwhile and after.
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_surplus_ones_get_json_503() {
    let gw = Gateway::start(&format!("{FAST_HTTP}max_connections = 20\n")).await;
    // The test client's pooled keep-alive connection (from the readiness
    // check) is closed by the header timeout first, so exactly the 20 below
    // are open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect(&gw).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The 21st is refused at once, with JSON and Connection: close.
    let mut extra = connect(&gw).await;
    let (answer, ended) = read_to_end(&mut extra, Duration::from_secs(2)).await;
    assert!(ended.is_some(), "the surplus connection stayed open");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "too_many_connections");
    // The idle ones are closed by the header timeout, freeing their places.
    for s in &mut idle {
        let (_, ended) = read_to_end(s, Duration::from_secs(3)).await;
        assert!(
            ended.is_some(),
            "an idle connection was kept past the timeout"
        );
    }
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.metric("mmgate_connections_total", "refused").await >= 1.0);
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_uploads_reserve_nothing_block_nobody_and_time_out_with_408() {
    let gw = Gateway::start(&format!(
        "{FAST_HTTP}[server]\nmax_inflight_body_bytes = 536870912\n"
    ))
    .await;
    // Four uploads declaring 256 MiB, and four chunked ones, none sending a
    // body byte: under the old declared-size reservation (a chunked body
    // counted as the largest allowed, 256 MiB), two of them took the whole
    // 512 MiB budget.
    let mut silent = Vec::new();
    for i in 0..8 {
        let mut s = connect(&gw).await;
        let framing = if i % 2 == 0 {
            "Content-Length: 268435456"
        } else {
            "Transfer-Encoding: chunked"
        };
        let head = format!(
            "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n{framing}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        silent.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = gw.good_image().await;
    assert_eq!(
        r.status, 200,
        "silent uploads blocked an upload: {}",
        r.json
    );
    // Each silent upload ends with a JSON 408 after the body idle timeout.
    for s in &mut silent {
        let (answer, ended) = read_to_end(s, Duration::from_secs(4)).await;
        assert!(ended.is_some(), "a silent upload was held open");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"body_timeout\""), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_names_are_clipped_and_403_is_counted_under_the_tenant() {
    let gw = Gateway::start(&tenant("acme", "models = [\"other\"]")).await;
    let long = "m".repeat(60_000);
    let r = gw
        .client
        .post(gw.url(&format!("/v1/models/{long}/score")))
        .header("x-api-key", "key-acme")
        .body(fixture("images/coffee.jpg"))
        .send()
        .await
        .unwrap();
    let r = Reply::read(r).await;
    assert_eq!(r.status, 403, "{}", r.json);
    let msg = r.json["error"]["message"].as_str().unwrap();
    assert!(
        msg.len() < 400,
        "the 60 KB name was echoed: {} bytes",
        msg.len()
    );
    let m = gw.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("mmgate_requests_total")
            && l.contains("tenant=\"acme\"")
            && l.contains("code=\"403\"")),
        "403 not counted under tenant acme:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_file_names_are_echoed_clipped() {
    let gw = Gateway::start("").await;
    let long = "n".repeat(1_900_000);
    let mut form = reqwest::multipart::Form::new();
    for _ in 0..4 {
        form = form.part(
            "image",
            reqwest::multipart::Part::bytes(fixture("images/coffee.jpg")).file_name(long.clone()),
        );
    }
    let r = gw
        .client
        .post(gw.url("/v1/models/open_nsfw/score"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let r = Reply::read(r).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let answer = r.json.to_string();
    assert!(answer.len() < 8_000, "answer is {} bytes", answer.len());
    let name = r.json["results"][0]["name"].as_str().unwrap();
    assert!(name.ends_with('…') && name.chars().count() == 129, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_does_not_stretch_the_drain() {
    let mut gw = Gateway::start("").await;
    let mut s = connect(&gw).await;
    s.write_all(b"POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    kill(Pid::from_raw(gw.pid() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| gw.child.wait()).unwrap();
    assert!(status.success(), "{status:?}");
    // The test config's grace is 10 s; an idle or half-sent head must not
    // hold the drain for it.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        t.elapsed()
    );
}

/// A flood of surplus connections that never read: refusing them must not
/// cost an fd each for long, or the flood takes the fds a restarting child
/// needs. At most a small, fixed number are being answered at once; the
/// rest are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_surplus_connections_costs_a_bounded_number_of_fds() {
    let gw = Gateway::start(&format!("{FAST_HTTP}max_connections = 4\n")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(&gw).await);
    }
    // 400 more, each sending a request head and never reading.
    for _ in 0..400 {
        let mut s = connect(&gw).await;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let during = fds();
    println!("gateway fds: {before} before, {during} with 404 connections open");
    assert!(
        during < before + 4 + 80,
        "refusing 400 connections held {} fds",
        during - before
    );
    drop(held);
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// Requests hyper itself rejects before the app sees them (a malformed
/// request line, too many headers, a URI past 64 KiB, a head past the
/// buffer) are answered in the same JSON error schema as every other
/// error, with a stable code, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_rejects_get_json_errors() {
    let gw = Gateway::start("").await;
    let many_headers: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases = [
        ("GARBAGE\r\n\r\n".to_string(), 400, "bad_request"),
        (
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70_000)),
            414,
            "uri_too_long",
        ),
        // Over http.max_header_bytes (32 KiB) and within hyper's read
        // buffer: refused however the head arrives (hyper alone let a head
        // that arrived in one read through).
        (
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(40_000)
            ),
            431,
            "headers_too_large",
        ),
        // Past hyper's read buffer.
        (
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(500_000)
            ),
            431,
            "headers_too_large",
        ),
    ];
    for (raw, status, code) in cases {
        let mut s = connect(&gw).await;
        let _ = s.write_all(raw.as_bytes()).await;
        let (answer, end) = read_to_end(&mut s, Duration::from_secs(5)).await;
        assert!(
            end.is_some(),
            "connection left open after {status} ({} bytes sent): {answer:?}",
            raw.len()
        );
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no answer for {status}: {answer:?}"));
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{head}");
        assert!(
            lower.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(lower.contains("connection: close"), "{head}");
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert_eq!(v["error"]["code"], code, "{body}");
    }
    // The gateway still serves.
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// 30 clients of one tenant pipeline requests whose answers are as large
/// as answers get (16 parts, each echoing a long file name) and never read
/// a byte. The gateway holds what it buffers for them within its budget,
/// its memory stays flat, another tenant's client is served meanwhile, and
/// every byte held for them is released once they are gone.
///
/// Their 90 uploads of 2 MB are real load, more than the 32 MiB budget
/// holds while they wait for the workers; what keeps room for others is
/// the tenant's share (half the budget by default). Without tenants the
/// budget is one pool, and uploads past it are shed with 503 whoever sends
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_clients_that_never_read_keep_the_gateway_within_its_budget() {
    const BUDGET: u64 = 32 << 20;
    let gw = Gateway::start(&format!(
        "[server]\nmax_inflight_body_bytes = {BUDGET}\n\
         [limits]\nmax_body_bytes = 4194304\n[video]\nmax_body_bytes = 4194304\n{}{}",
        tenant("deaf", ""),
        tenant("good", ""),
    ))
    .await;
    let pid = gw.pid();
    // Warm up: the first requests size the allocator's pools.
    for _ in 0..3 {
        let r = gw.good_image_as("key-good").await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let before = status_kb(pid, "VmRSS") * 1024;
    let gif = fixture("images/no_time_for_that_tiny.gif");
    let name = "n".repeat(120_000);
    let mut body = Vec::new();
    for _ in 0..16 {
        body.extend_from_slice(
            format!(
                "--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n\
                 Content-Type: image/gif\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&gif);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XX--\r\n");
    let head = format!(
        "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nx-api-key: key-deaf\r\n\
         Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(&body);
    let request = std::sync::Arc::new(request);
    // Each client pipelines 3 requests (about 2 MB each) and never reads.
    let mut clients = Vec::new();
    for _ in 0..30 {
        let s = connect(&gw).await;
        let req = request.clone();
        clients.push(tokio::spawn(async move {
            let mut s = s;
            for _ in 0..3 {
                if s.write_all(&req).await.is_err() {
                    break;
                }
            }
            s
        }));
    }
    // While they push, a good client is served and the gateway's memory
    // and buffered bytes stay within the budget.
    let mut peak_rss = 0;
    let mut peak_buffered = 0.0f64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let r = gw.good_image_as("key-good").await;
        assert_eq!(r.status, 200, "{}", r.json);
        peak_rss = peak_rss.max(status_kb(pid, "VmRSS") * 1024);
        peak_buffered = peak_buffered.max(gw.metric("mmgate_buffered_bytes", "").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "peak buffered {peak_buffered} bytes, RSS {} → peak {} MiB",
        before >> 20,
        peak_rss >> 20
    );
    assert!(
        peak_buffered > 0.0 && peak_buffered <= BUDGET as f64,
        "buffered {peak_buffered} bytes, budget {BUDGET}"
    );
    let growth = peak_rss.saturating_sub(before);
    assert!(
        growth < BUDGET + (16 << 20),
        "gateway RSS grew by {} MiB (budget {} MiB)",
        growth >> 20,
        BUDGET >> 20
    );
    let mut sockets = Vec::new();
    for c in clients {
        sockets.push(c.await.unwrap());
    }
    drop(sockets);
    let t = Instant::now();
    loop {
        let held = gw.metric("mmgate_buffered_bytes", "").await;
        if held == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{held} bytes still held after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A raw HTTP/2 connection to the gRPC listener at `addr`, to play
/// clients no gRPC library would.
async fn h2_connect(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client
}

type GrpcCall = (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>);

/// Starts a call of `method` (as the tenant with `key`, if any) and sends
/// `message` (a gRPC frame, or the start of one), ending the stream if
/// `end`.
async fn grpc_send(
    client: &h2::client::SendRequest<bytes::Bytes>,
    addr: &str,
    method: &str,
    key: Option<&str>,
    message: Vec<u8>,
    end: bool,
) -> GrpcCall {
    let mut client = client.clone().ready().await.unwrap();
    let mut req = axum::http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let (answer, mut stream) = client.send_request(req.body(()).unwrap(), false).unwrap();
    stream.send_data(message.into(), end).unwrap();
    (answer, stream)
}

/// gRPC messages count in the buffer budget as they arrive, as uploads
/// do: a tenant's calls that stall mid-message hold what they sent, within
/// the tenant's share (past it a call gets RESOURCE_EXHAUSTED), another
/// tenant is served meanwhile, and the stalled calls end with
/// DEADLINE_EXCEEDED at the body idle timeout, releasing their bytes. A
/// call that needs no key (metadata, readiness) may send only a small
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_grpc_messages_count_in_the_budget_and_time_out() {
    use axum::http;
    // A 6 MiB budget: the flooding tenant's five calls would take it all
    // without its 3 MiB share.
    let gw = Gateway::start_with(
        &format!(
            "[http]\nbody_idle_timeout_ms = 3000\n[server]\nmax_inflight_body_bytes = 6291456\n\
             [limits]\nmax_body_bytes = 2097152\n[video]\nmax_body_bytes = 2097152\n{}{}",
            tenant("flood", ""),
            tenant("calm", ""),
        ),
        &[("MMGATE_GRPC_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let addr = gw.grpc_addr.clone().unwrap();
    let client = h2_connect(&addr).await;
    // One whole call first: the connection's settings are exchanged (its
    // 4 MiB windows in force) before the calls that stall.
    let (answer, _stream) = grpc_send(&client, &addr, "ServerLive", None, vec![0; 5], true).await;
    assert_eq!(answer.await.unwrap().status(), 200);
    // A call on `method` whose message declares `declared` bytes and sends
    // `sent` of them, then stalls.
    let stall = |method: &'static str, key: Option<&'static str>, declared: u32, sent: usize| {
        let mut message = vec![0u8; sent];
        message[1..5].copy_from_slice(&declared.to_be_bytes());
        grpc_send(&client, &addr, method, key, message, false)
    };
    let grpc_status = |r: &http::Response<h2::RecvStream>| {
        let h = r.headers();
        format!(
            "{} {}",
            h.get("grpc-status").map_or("-", |v| v.to_str().unwrap()),
            h.get("grpc-message").map_or("", |v| v.to_str().unwrap())
        )
    };
    // Five calls each declare a 2,000,000-byte message, send 1.5 MB of it
    // and stall: two fit in the tenant's 3 MiB share, three not.
    let mut calls = Vec::new();
    for _ in 0..5 {
        calls.push(stall("ModelInfer", Some("key-flood"), 2_000_000, 1_500_000).await);
    }
    // The calls' bytes arrive and are counted.
    const TWO: f64 = 2.0 * 1_400_000.0;
    let t = Instant::now();
    let mut held = 0.0;
    while t.elapsed() < Duration::from_secs(5) {
        held = gw.metric("mmgate_buffered_bytes", "").await;
        if held >= TWO {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        (TWO..=3_145_728.0).contains(&held),
        "the stalled calls hold {held} bytes (two of 1.5 MB expected, within the 3 MiB share)"
    );
    // Another tenant is served meanwhile.
    let r = gw.good_image_as("key-calm").await;
    assert_eq!(r.status, 200, "the calm tenant was blocked: {}", r.json);
    // A call that needs no key cannot park a large message.
    let (answer, _stream) = stall("ServerLive", None, 1_000_000, 100_000).await;
    let r = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("a large ServerLive message is refused at once")
        .unwrap();
    assert!(grpc_status(&r).starts_with("3 "), "{}", grpc_status(&r));
    // Each call is answered: three refused at once, two at the idle
    // timeout.
    let mut codes = Vec::new();
    for (answer, _stream) in calls {
        let r = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("a stalled call is answered within the idle timeout")
            .unwrap();
        codes.push(grpc_status(&r));
    }
    codes.sort();
    let timed_out = codes
        .iter()
        .filter(|c| c.starts_with("4 body_timeout"))
        .count();
    let refused = codes
        .iter()
        .filter(|c| c.starts_with("8 tenant_upload_budget_exhausted"))
        .count();
    assert_eq!((timed_out, refused), (2, 3), "{codes:?}");
    let t = Instant::now();
    while gw.metric("mmgate_buffered_bytes", "").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "bytes still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `ModelInfer` message made of many empty repeated entries (2 wire
/// bytes each, hundreds of bytes each once decoded) is refused on the wire,
/// before prost decodes it: 4 MB of empty `inputs` would decode to about
/// 600 MB. The gateway's peak memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_that_decodes_to_far_more_than_its_size_is_refused() {
    let gw = Gateway::start_with("", &[("MMGATE_GRPC_LISTEN", "127.0.0.1:0")]).await;
    let pid = gw.pid();
    let before = status_kb(pid, "VmHWM");
    let addr = gw.grpc_addr.clone().unwrap();
    let client = h2_connect(&addr).await;
    // Field 5 (`inputs`), an empty message, two million times.
    let entries = 2_000_000usize;
    let mut message = vec![0u8; 5];
    message[1..5].copy_from_slice(&((2 * entries) as u32).to_be_bytes());
    message.extend(std::iter::repeat_n([0x2Au8, 0x00], entries).flatten());
    let (answer, _stream) = grpc_send(&client, &addr, "ModelInfer", None, message, true).await;
    let r = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("answered")
        .unwrap();
    let code = r
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let grown_mb = status_kb(pid, "VmHWM").saturating_sub(before) / 1024;
    assert_eq!(code.as_deref(), Some("3"), "{:?}", r.headers());
    assert!(
        grown_mb < 64,
        "the gateway's peak memory grew by {grown_mb} MB"
    );
}

/// Connections to the gRPC listener that never send a byte are closed at
/// the header timeout, so they cannot hold its few connection slots: with
/// `grpc.max_connections = 2` taken by two silent sockets, a real client
/// is served once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_grpc_connections_are_closed_at_the_header_timeout() {
    let gw = Gateway::start_with(
        &format!("{FAST_HTTP}[grpc]\nmax_connections = 2\n"),
        &[("MMGATE_GRPC_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let addr = gw.grpc_addr.clone().unwrap();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    for s in &mut silent {
        let (_, ended) = read_to_end(s, Duration::from_secs(5)).await;
        let ended = ended.expect("a silent gRPC connection was held 5 s");
        assert!(
            ended < Duration::from_millis(2500),
            "closed after {ended:?}"
        );
    }
    let client = h2_connect(&addr).await;
    let (answer, _stream) = grpc_send(&client, &addr, "ServerLive", None, vec![0; 5], true).await;
    let r = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A shared-memory registration that stalls mid-body holds nothing for
/// long: with the extension off it is refused before its body is read,
/// and with it on the body is read under the upload idle timeout (408).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shared_memory_registration_is_cut_off() {
    for allowed in ["false", "true"] {
        let gw = Gateway::start_with(FAST_HTTP, &[("MMGATE_ALLOW_CLIENT_SHM", allowed)]).await;
        let mut s = connect(&gw).await;
        s.write_all(
            b"POST /v2/systemsharedmemory/region/r/register HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 1000\r\n\r\n{\"key\": ",
        )
        .await
        .unwrap();
        // The answer, then the close after a lingering read (2 s).
        let (answer, ended) = read_to_end(&mut s, Duration::from_secs(8)).await;
        let ended = ended.unwrap_or_else(|| panic!("allowed={allowed}: held 8 s: {answer:?}"));
        let want = if allowed == "true" {
            "HTTP/1.1 408"
        } else {
            "HTTP/1.1 400"
        };
        assert!(answer.starts_with(want), "allowed={allowed}: {answer}");
        assert!(ended < Duration::from_secs(4), "ended after {ended:?}");
    }
}

/// One tenant's uploads cannot take the whole buffer budget: each tenant
/// holds at most its share (by default half of it), past which its own
/// uploads get 429, and another tenant's upload still fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_take_the_whole_upload_budget() {
    let gw = Gateway::start(&format!(
        "[server]\nmax_inflight_body_bytes = 8388608\n\
         [limits]\nmax_body_bytes = 2097152\n[video]\nmax_body_bytes = 2097152\n{}{}",
        tenant("flood", ""),
        tenant("calm", ""),
    ))
    .await;
    // Five uploads of the flooding tenant send 2.09 MB of 2.1 MB and pause:
    // four of them would hold all but 28 KB of the 8 MiB budget.
    // All five are sent at once, in 64 KiB pieces, so their bytes arrive
    // interleaved.
    let mut floods = Vec::new();
    for _ in 0..5 {
        floods.push(connect(&gw).await);
    }
    let head = "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\n\
                x-api-key: key-flood\r\nContent-Type: image/jpeg\r\nContent-Length: 2097000\r\n\r\n";
    let mut body = vec![0u8; 2_090_000];
    body[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
    let body = &body;
    futures::future::join_all(floods.iter_mut().map(|s| async move {
        let _ = s.write_all(head.as_bytes()).await;
        for piece in body.chunks(64 << 10) {
            if s.write_all(piece).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }))
    .await;
    // The server reads the five as their bytes come (on a busy machine,
    // interleaved): each upload ends up either wholly held or refused with
    // 429 when its next bytes would pass the tenant's 4 MiB share. Wait
    // until all five are one or the other.
    const ONE: f64 = 2_091_008.0; // 2,090,000 bytes in whole KiB
    let t = Instant::now();
    let mut held = 0.0;
    let mut refused = 0;
    let mut answered = [false; 5];
    while t.elapsed() < Duration::from_secs(15) {
        for (s, done) in floods.iter_mut().zip(&mut answered) {
            let mut buf = [0u8; 4096];
            if *done {
                continue;
            }
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await
                && n > 0
            {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 429"), "{text}");
                assert!(text.contains("tenant_upload_budget_exhausted"), "{text}");
                *done = true;
                refused += 1;
            }
        }
        held = gw.metric("mmgate_buffered_bytes", "").await;
        if refused as f64 + held / ONE == 5.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = held / ONE;
    println!("{kept} uploads held, {refused} refused");
    assert_eq!(
        refused as f64 + kept,
        5.0,
        "{refused} refused, {held} bytes held: each upload is wholly held or refused"
    );
    assert!(
        (1.0..=2.0).contains(&kept) && held <= 4_194_304.0,
        "the flooding tenant holds {held} bytes; its share is 4 MiB"
    );
    let r = gw.good_image_as("key-calm").await;
    assert_eq!(r.status, 200, "the calm tenant was blocked: {}", r.json);
}

/// A client that sends its whole upload before reading (as most HTTP
/// libraries do) still gets the JSON refusal the gateway answered before
/// reading the body, not a reset: the gateway reads and discards the rest
/// of the upload for a moment before it closes (a lingering close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_the_body_reaches_a_client_that_sends_it_all_first() {
    let gw = Gateway::start(&tenant("a", "")).await;
    for _ in 0..3 {
        let mut s = connect(&gw).await;
        let len = 8_000_000;
        let head = format!(
            "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nx-api-key: wrong\r\n\
             Content-Type: image/jpeg\r\nContent-Length: {len}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let sent = s.write_all(&vec![0u8; len]).await;
        let (answer, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
        // A client library that stops at a failed send (Python's
        // http.client does) would never read the answer.
        assert!(sent.is_ok(), "the upload was cut off: {sent:?}");
        assert!(
            answer.starts_with("HTTP/1.1 401") && answer.contains("invalid_api_key"),
            "answer {answer:?}"
        );
    }
}

/// The admin listener takes only a few connections (16): idle ones there
/// cannot take the fds the public listener and restarting children need,
/// and surplus ones get the same JSON 503, while scoring goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_holds_only_a_few_connections() {
    let gw = Gateway::start("").await;
    let admin = gw.admin_addr.clone().unwrap();
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(&admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(&admin).await.unwrap();
    let (answer, ended) = read_to_end(&mut extra, Duration::from_secs(2)).await;
    assert!(ended.is_some(), "a 17th admin connection was kept open");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// hyper strips the whitespace around a header value before the app can
/// count it, so padding must be bounded by hyper's read buffer, which is
/// sized from the limits (the longest URI plus `http.max_header_bytes`),
/// not hyper's ~400 KiB default: a value padded with 120 KB of spaces is
/// refused with the JSON 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_padded_with_whitespace_is_refused() {
    let gw = Gateway::start("").await;
    let mut s = connect(&gw).await;
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: {}v\r\n\r\n",
        " ".repeat(120_000)
    );
    let _ = s.write_all(head.as_bytes()).await;
    let (answer, end) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert!(end.is_some(), "connection left open: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    assert!(answer.contains("\"headers_too_large\""), "{answer:?}");
    let r = gw.good_image().await;
    assert_eq!(r.status, 200, "{}", r.json);
}

/// hyper's own refusals (a head it cannot parse, too many headers) close
/// the connection like the app's do: lingering, so a client that sends its
/// whole upload before reading still gets the JSON answer, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_http_layer_reaches_a_client_that_sends_it_all_first() {
    let gw = Gateway::start("").await;
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let len = 8_000_000;
    let heads = [
        (
            format!(
                "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\n{many}\
                 Content-Length: {len}\r\n\r\n"
            ),
            "HTTP/1.1 431",
            "headers_too_large",
        ),
        (
            format!(
                "POST /v1/models/open_nsfw/score HTTP/1.1\r\nHost: x\r\nBad Header\r\n\
                 Content-Length: {len}\r\n\r\n"
            ),
            "HTTP/1.1 400",
            "bad_request",
        ),
    ];
    for (head, status, code) in heads {
        for _ in 0..3 {
            let mut s = connect(&gw).await;
            s.write_all(head.as_bytes()).await.unwrap();
            let sent = s.write_all(&vec![0u8; len]).await;
            let (answer, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
            assert!(sent.is_ok(), "{status}: the upload was cut off: {sent:?}");
            assert!(
                answer.starts_with(status) && answer.contains(code),
                "answer {answer:?}"
            );
        }
    }
}
