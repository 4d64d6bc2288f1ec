//! Logs and traces of the binary. Logs go to stderr as text, or as one JSON object per line
//! (`MAYFLY_LOG_FORMAT=json`) carrying the fields of the spans they happen in — execution
//! id, step, tenant, request id. Traces are off unless an OTLP endpoint is configured
//! (`--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`); then spans go to it over OTLP/HTTP
//! (protobuf, or JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) in batches.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes the trace exporter when dropped (at exit).
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: traces not flushed: {e}");
        }
    }
}

/// Where traces go, from the command line or the standard OpenTelemetry environment.
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// Install the process's subscriber: the `MAYFLY_LOG` filter (default `warn`), text or JSON
/// logs on stderr, and, with an endpoint, the OTLP trace pipeline for `service`.
pub fn init(service: &str, endpoint: Option<String>) -> Result<Guard, String> {
    let filter = || EnvFilter::try_from_env("MAYFLY_LOG").unwrap_or_else(|_| "warn".into());
    let json = std::env::var("MAYFLY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    };
    let (otel, provider) = match endpoint {
        None => (None, None),
        Some(endpoint) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                Ok("http/json") => Protocol::HttpJson,
                Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
                Ok(other) => {
                    return Err(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL `{other}`: use http/protobuf or http/json"
                    ));
                }
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("OTLP exporter: {e}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(service.to_owned())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("mayfly");
            // Spans are exported whatever MAYFLY_LOG says; only mayfly's own.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(EnvFilter::new(
                    "mayfly=info,mayfly_gateway=info,mayfly_runtime=info,mayfly_tools=info",
                ));
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Guard(provider))
}
