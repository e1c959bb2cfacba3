//! A closed-loop load of CreateInvoice calls against a running gateway, each
//! call with a fresh `idempotency-key` (or none): what h2load cannot do, as
//! it sends the same headers on every request. Used by
//! `scripts/bench.d/keyed.sh` to measure the idempotency store's cost per
//! keyed call (a lease and a record, with or without `WAIT`).
//!
//! ```text
//! cargo bench --bench keyed -- --target 127.0.0.1:50051 --concurrency 64 \
//!     --seconds 5 [--warmup 1] [--unkeyed]
//! ```
//!
//! Prints one line of `key=value` pairs: calls, errors, calls/s, p50, p99
//! and p99.9 (microseconds). Each concurrent client has its own HTTP/2
//! connection and one call at a time, as h2load's `-c N -m 1`.

use std::time::{Duration, Instant};

use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use tonic::transport::Endpoint;

struct Options {
    target: String,
    concurrency: usize,
    seconds: f64,
    warmup: f64,
    keyed: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        target: String::new(),
        concurrency: 1,
        seconds: 5.0,
        warmup: 1.0,
        keyed: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--target" => options.target = value("--target")?,
            "--concurrency" => {
                options.concurrency = value("--concurrency")?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--seconds" => {
                options.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--warmup" => {
                options.warmup = value("--warmup")?
                    .parse()
                    .map_err(|e| format!("--warmup: {e}"))?
            }
            "--unkeyed" => options.keyed = false,
            // `cargo bench` passes `--bench`; nothing else is expected.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.target.is_empty() {
        return Err("--target HOST:PORT is required".into());
    }
    Ok(options)
}

/// One client's calls for `seconds`: their latencies, and the errors.
async fn client(
    mut grpc: InvoiceServiceClient<tonic::transport::Channel>,
    worker: usize,
    keyed: bool,
    until: Instant,
) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut errors = 0;
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let mut request = tonic::Request::new(pb::CreateInvoiceRequest {
            order_id: "ord-1".into(),
            ..Default::default()
        });
        let metadata = request.metadata_mut();
        metadata.insert("api-key", tonic::metadata::MetadataValue::from_static("k"));
        metadata.insert(
            "organization-id",
            tonic::metadata::MetadataValue::from_static("o"),
        );
        if keyed {
            // Unique per run, client and call.
            let key = format!("bench-{}-{worker}-{n}", std::process::id());
            if let Ok(value) = key.parse() {
                metadata.insert("idempotency-key", value);
            }
        }
        let started = Instant::now();
        match grpc.create_invoice(request).await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(_) => errors += 1,
        }
    }
    (latencies, errors)
}

async fn run(options: &Options, seconds: f64) -> Result<(Vec<Duration>, u64, Duration), String> {
    let endpoint =
        Endpoint::from_shared(format!("http://{}", options.target)).map_err(|e| e.to_string())?;
    let mut clients = Vec::with_capacity(options.concurrency);
    for _ in 0..options.concurrency {
        // One connection per client, as h2load's `-c`.
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        clients.push(InvoiceServiceClient::new(channel));
    }
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, grpc)| tokio::spawn(client(grpc, i, options.keyed, until)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await.map_err(|e| e.to_string())?;
        latencies.append(&mut l);
        errors += e;
    }
    Ok((latencies, errors, started.elapsed()))
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_micros()
}

fn main() -> std::process::ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(problem) => {
            eprintln!("keyed: {problem}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keyed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if options.warmup > 0.0 {
            run(&options, options.warmup).await?;
        }
        run(&options, options.seconds).await
    });
    match result {
        Ok((mut latencies, errors, elapsed)) => {
            latencies.sort_unstable();
            println!(
                "calls={} errors={errors} seconds={:.3} calls_per_second={:.0} p50_us={} p99_us={} p999_us={}",
                latencies.len(),
                elapsed.as_secs_f64(),
                latencies.len() as f64 / elapsed.as_secs_f64(),
                percentile(&latencies, 0.50),
                percentile(&latencies, 0.99),
                percentile(&latencies, 0.999),
            );
            if errors > 0 {
                eprintln!("keyed: {errors} calls failed");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("keyed: {problem}");
            std::process::ExitCode::FAILURE
        }
    }
}
