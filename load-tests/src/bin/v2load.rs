//! Closed-loop load of raw tensors over the KServe v2 protocol: each of
//! `concurrency` clients sends one `FP32 [1, …]` tensor of the model's
//! input shape after another, over HTTP (binary tensor extension) or gRPC
//! (`raw_input_contents`), for `seconds`; prints one JSON line with
//! throughput and p50/p99 latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
mod pb {
    tonic::include_proto!("inference");
}

#[derive(Debug, Parser)]
struct Args {
    /// `http` (base URL in --url) or `grpc` (address in --url).
    #[arg(long)]
    protocol: String,
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "open_nsfw")]
    model: String,
    #[arg(long, default_value = "configs/models/open_nsfw.toml")]
    spec: std::path::PathBuf,
    #[command(flatten)]
    load: load_tests::Closed,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let spec = config::ModelSpec::load(&a.spec)?;
    let shape: Vec<i64> = spec
        .input
        .batch_shape(1)
        .iter()
        .map(|&d| d as i64)
        .collect();
    let tensor: Vec<u8> = (0..spec.input.elements())
        .flat_map(|i| (((i * 7919) % 255) as f32 - 120.0).to_le_bytes())
        .collect();
    let tensor = bytes::Bytes::from(tensor);
    let start = Instant::now();
    let from = start + Duration::from_secs_f64(a.load.warmup);
    let to = from + Duration::from_secs_f64(a.load.seconds);
    let mut clients = Vec::new();
    for _ in 0..a.load.concurrency {
        let (a_model, shape, tensor) = (a.model.clone(), shape.clone(), tensor.clone());
        let input = spec.input.name.clone();
        let (protocol, url) = (a.protocol.clone(), a.url.clone());
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let send = Sender::new(&protocol, &url, &a_model, &input, &shape, tensor.len()).await?;
            while Instant::now() < to {
                let t = Instant::now();
                let ok = send.infer(&tensor).await;
                let done = Instant::now();
                if done >= from && done < to {
                    if ok {
                        lat.push(done - t);
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for c in clients {
        let (l, e) = c.await??;
        lat.extend(l);
        errors += e;
    }
    let (p50, p99, mean) = load_tests::summary(&mut lat);
    let line = serde_json::json!({
        "protocol": a.protocol,
        "concurrency": a.load.concurrency,
        "ok": lat.len(),
        "errors": errors,
        "throughput_per_s": lat.len() as f64 / a.load.seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": mean,
    });
    println!("{line}");
    Ok(())
}

enum Sender {
    Http {
        client: reqwest::Client,
        url: String,
        head: Arc<Vec<u8>>,
    },
    Grpc {
        client: pb::grpc_inference_service_client::GrpcInferenceServiceClient<
            tonic::transport::Channel,
        >,
        model: String,
        input: String,
        shape: Vec<i64>,
    },
}

impl Sender {
    async fn new(
        protocol: &str,
        url: &str,
        model: &str,
        input: &str,
        shape: &[i64],
        size: usize,
    ) -> anyhow::Result<Self> {
        Ok(match protocol {
            "http" => {
                let head = serde_json::json!({
                    "inputs": [{"name": input, "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}],
                    "outputs": [{"name": "scores", "parameters": {"binary_data": true}}],
                });
                Sender::Http {
                    client: reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .build()?,
                    url: format!("{url}/v2/models/{model}/infer"),
                    head: Arc::new(serde_json::to_vec(&head)?),
                }
            }
            "grpc" => {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{url}"))?
                    .tcp_nodelay(true)
                    .initial_stream_window_size(4 << 20)
                    .initial_connection_window_size(16 << 20)
                    .connect()
                    .await?;
                let client =
                    pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20);
                Sender::Grpc {
                    client,
                    model: model.into(),
                    input: input.into(),
                    shape: shape.to_vec(),
                }
            }
            other => anyhow::bail!("--protocol {other}: use http or grpc"),
        })
    }

    async fn infer(&self, tensor: &bytes::Bytes) -> bool {
        match self {
            Sender::Http { client, url, head } => {
                let mut body = Vec::with_capacity(head.len() + tensor.len());
                body.extend_from_slice(head);
                body.extend_from_slice(tensor);
                let r = client
                    .post(url)
                    .header("inference-header-content-length", head.len().to_string())
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
            Sender::Grpc {
                client,
                model,
                input,
                shape,
            } => {
                let req = pb::ModelInferRequest {
                    model_name: model.clone(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: input.clone(),
                        datatype: "FP32".into(),
                        shape: shape.clone(),
                        ..Default::default()
                    }],
                    raw_input_contents: vec![tensor.to_vec()],
                    ..Default::default()
                };
                client.clone().model_infer(req).await.is_ok()
            }
        }
    }
}
