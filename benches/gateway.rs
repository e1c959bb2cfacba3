//! Gateway overhead benchmark (`cargo bench`): the same REST call made
//! directly with reqwest and through the gateway with a tonic client, against
//! a fixed-answer upstream on loopback, at a fixed concurrency. Prints
//! throughput, latency percentiles, the gateway's added latency, and the
//! process's peak resident memory.
//!
//! Knobs: BENCH_CALLS (default 20000), BENCH_CONCURRENCY (default 64).
//! Everything (load generator, gateway, upstream) shares this machine's
//! cores, so compare numbers from the same machine only.

use std::time::{Duration, Instant};

use axum::routing::patch;
use tokio::net::TcpListener;

use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::proto::v1::{CloseInvoiceRequest, CloseInvoiceResponse};
use gormic_gateway::server::{ServerOptions, run};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::upstream::{Upstream, UpstreamOptions};

const ANSWER: &str = r#"{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"invoiceNumber":1043,"invoiceSource":"POS","invoicedAt":"2026-11-25T10:00:00Z"}}"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls = env_usize("BENCH_CALLS", 20_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64).max(1);

    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_url = format!("http://{}", upstream.local_addr()?);
    let app = axum::Router::new().route(
        "/v1/om/invoices/{id}/close",
        patch(|| async { ([("content-type", "application/json")], ANSWER) }),
    );
    tokio::spawn(async move { axum::serve(upstream, app).await });

    let gateway_listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = gateway_listener.local_addr()?;
    let client = Upstream::new(&upstream_url.parse()?, UpstreamOptions::default())?;
    tokio::spawn(run(
        gateway_listener,
        InvoiceGateway::new(client),
        std::future::pending(),
        ServerOptions::default(),
    ));

    // Direct: what a caller speaking REST itself would see.
    let http = reqwest::Client::new();
    let url = format!("{upstream_url}/v1/om/invoices/inv-1/close");
    let direct = load(calls, concurrency, move || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .patch(&url)
                .header("api-key", "bench")
                .header("organization-id", "org")
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let bytes = response.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string())?;
            Ok(())
        }
    })
    .await?;

    // Through the gateway: one HTTP/2 connection, as a tonic client uses.
    let grpc = InvoiceServiceClient::connect(format!("http://{gateway_addr}")).await?;
    let gateway = load(calls, concurrency, move || {
        let mut grpc = grpc.clone();
        async move {
            let mut request = tonic::Request::new(CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            });
            request
                .metadata_mut()
                .insert("api-key", "bench".parse().map_err(|_| "metadata")?);
            request
                .metadata_mut()
                .insert("organization-id", "org".parse().map_err(|_| "metadata")?);
            let response: CloseInvoiceResponse = grpc
                .close_invoice(request)
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            if response.invoice_number != 1043 {
                return Err(format!("unexpected answer {response:?}"));
            }
            Ok(())
        }
    })
    .await?;

    // The gRPC hop alone: refused for its missing api-key, nothing goes upstream.
    let grpc = InvoiceServiceClient::connect(format!("http://{gateway_addr}")).await?;
    let grpc_only = load(calls, concurrency, move || {
        let mut grpc = grpc.clone();
        async move {
            let request = tonic::Request::new(CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            });
            match grpc.close_invoice(request).await {
                Err(status) if status.code() == tonic::Code::Unauthenticated => Ok(()),
                other => Err(format!("expected UNAUTHENTICATED, got {other:?}")),
            }
        }
    })
    .await?;

    println!("gateway benchmark: {calls} CloseInvoice calls, concurrency {concurrency}");
    grpc_only.print("gRPC hop only (refused call)");
    direct.print("direct REST (reqwest)");
    gateway.print("through the gateway (tonic)");
    println!(
        "added latency: p50 {:.0} µs, p99 {:.0} µs",
        micros(gateway.percentile(50.0)) - micros(direct.percentile(50.0)),
        micros(gateway.percentile(99.0)) - micros(direct.percentile(99.0)),
    );
    if let Some(peak) = peak_rss_kib() {
        println!(
            "peak RSS of the whole process (load generator + gateway + upstream): {} MiB",
            peak / 1024
        );
    }
    Ok(())
}

struct Run {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        let index = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[index]
    }

    fn print(&self, name: &str) {
        println!(
            "{name:32} {:>8.0} calls/s   p50 {:>6.0} µs   p90 {:>6.0} µs   p99 {:>6.0} µs   max {:>6.0} µs",
            self.latencies.len() as f64 / self.elapsed.as_secs_f64(),
            micros(self.percentile(50.0)),
            micros(self.percentile(90.0)),
            micros(self.percentile(99.0)),
            micros(self.percentile(100.0)),
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `calls` calls, `concurrency` at a time, after a short warm-up.
async fn load<F, Fut>(calls: usize, concurrency: usize, call: F) -> Result<Run, String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    for _ in 0..concurrency.min(calls) {
        call().await?;
    }
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            let share = calls / concurrency + usize::from(worker < calls % concurrency);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(share);
                for _ in 0..share {
                    let t = Instant::now();
                    call().await?;
                    latencies.push(t.elapsed());
                }
                Ok::<_, String>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(calls);
    for worker in workers {
        latencies.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Run { elapsed, latencies })
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
