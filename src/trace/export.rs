//! The OTLP/gRPC export pipeline: an OpenTelemetry SDK tracer whose spans go
//! through a batch processor (its own thread) to a tonic exporter that runs
//! on a current-thread tokio runtime owned by this module, on its own
//! thread. Export therefore depends on no runtime of the gateway's (the
//! worker threads' runtimes, the main runtime): spans can end on any thread,
//! and shutdown can flush after every other runtime has stopped.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::config::{TraceConfig, TraceError};

/// How long shutdown waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time between two warnings about failed exports: a collector that
/// is down fails every batch, several a second under load.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// A running pipeline.
#[derive(Debug)]
pub(super) struct Pipeline {
    pub tracer: SdkTracer,
    provider: SdkTracerProvider,
    runtime: Mutex<Option<ExportRuntime>>,
}

/// The thread that drives the exporter's runtime.
#[derive(Debug)]
struct ExportRuntime {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl ExportRuntime {
    fn start() -> Result<(Self, Handle), std::io::Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok((Self { stop, thread }, handle))
    }

    fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::warn!("the OTLP export thread panicked");
        }
    }
}

impl Pipeline {
    pub fn start(config: &TraceConfig) -> Result<Option<Self>, TraceError> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(None);
        };
        let (runtime, handle) = ExportRuntime::start()?;
        let exporter = {
            // The tonic channel spawns its connection tasks on the runtime
            // current while it is built: ours.
            let _entered = handle.enter();
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.uri.to_string());
            if let Some(timeout) = config.timeout {
                builder = builder.with_timeout(timeout);
            }
            if endpoint.uri.scheme_str() == Some("https") {
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_webpki_roots(),
                );
            }
            builder.build()
        };
        let exporter = match exporter {
            Ok(exporter) => exporter,
            Err(error) => {
                runtime.stop();
                return Err(TraceError::Exporter {
                    endpoint: endpoint.to_string(),
                    reason: error.to_string(),
                });
            }
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut exporter = OnRuntime {
            inner: Arc::new(exporter),
            handle,
            failures: Arc::new(Mutex::new(Failures {
                endpoint: endpoint.uri.to_string(),
                ..Failures::default()
            })),
        };
        // Before the processor owns it, while the `Arc` is not shared.
        exporter.set_resource(&resource);
        // Batch settings come from OTEL_BSP_* (defaults: a batch every 5 s or
        // every 512 spans, at most 2048 spans queued, then spans are dropped).
        let processor = BatchSpanProcessor::builder(exporter).build();
        // Sampling follows OTEL_TRACES_SAMPLER; the default, parent-based
        // always-on, records every call whose caller did not decide otherwise.
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("gormic-gateway")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Some(Self {
            tracer,
            provider,
            runtime: Mutex::new(Some(runtime)),
        }))
    }

    /// Exports the spans ended so far; blocks until the collector answered.
    pub fn force_flush(&self) -> Result<(), TraceError> {
        self.provider
            .force_flush()
            .map_err(|e| TraceError::Flush(e.to_string()))
    }

    /// Exports the remaining spans, then stops the export thread. Blocks
    /// for at most a few seconds; later spans are dropped.
    pub fn shutdown(&self) -> Result<(), TraceError> {
        let Some(runtime) = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let result = match self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => Ok(()),
            Err(error) => Err(TraceError::Flush(error.to_string())),
        };
        runtime.stop();
        result
    }
}

impl Drop for Pipeline {
    /// The runtime must outlive the provider's flush.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Runs every export on the pipeline's runtime, whatever thread asks for
/// it (the batch processor's thread polls the result with a plain executor).
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    handle: Handle,
    failures: Arc<Mutex<Failures>>,
}

/// Failed exports since the last warning.
#[derive(Debug, Default)]
struct Failures {
    endpoint: String,
    warned: Option<Instant>,
    batches: u64,
    spans: u64,
}

impl Failures {
    /// The SDK's own diagnostics are compiled out: failures are said here,
    /// the first at once, then at most one warning per [`WARN_EVERY`].
    fn record(&mut self, spans: usize, error: &OTelSdkError) {
        self.batches += 1;
        self.spans += spans as u64;
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            endpoint = %self.endpoint,
            failed_batches = self.batches,
            lost_spans = self.spans,
            %error,
            "OTLP span export failed; these spans are lost"
        );
        self.warned = Some(Instant::now());
        self.batches = 0;
        self.spans = 0;
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let failures = Arc::clone(&self.failures);
        let spans = batch.len();
        let task = self.handle.spawn(async move { inner.export(batch).await });
        async move {
            let result = match task.await {
                Ok(result) => result,
                Err(error) => Err(OTelSdkError::InternalFailure(format!(
                    "the export task did not finish: {error}"
                ))),
            };
            if let Err(error) = &result {
                failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(spans, error);
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
