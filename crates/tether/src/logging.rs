//! How `tether` writes its log: one formatting layer, installed process-wide by the
//! commands, or scoped to one embedded gateway (its own file) by [`dispatch`].

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines: timestamp, level, target, fields, and the span list.
    Json,
}

/// The formatting layer every subscriber of ours starts from.
fn fmt_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    }
}

/// Installs the global subscriber writing to `writer`, and the OTLP exporter when
/// `otlp` names a collector (returned, to be flushed at exit).
pub fn init<W>(
    filter: tracing_subscriber::EnvFilter,
    format: LogFormat,
    writer: W,
    ansi: bool,
    otlp: Option<&str>,
) -> anyhow::Result<Option<tether_core::telemetry::Telemetry>>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let (otel, telemetry) = match otlp {
        Some(endpoint) => {
            let (layer, t) = tether_core::telemetry::Telemetry::start(endpoint)?;
            (Some(layer), Some(t))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer(format, writer, ansi))
        .with(otel)
        .with(filter)
        .init();
    Ok(telemetry)
}

/// The same lines as [`init`] (without trace export), as a dispatcher a caller scopes to
/// the threads of one gateway: how a test runs several gateways in one process, each with
/// its own log.
pub fn dispatch<W>(
    filter: tracing_subscriber::EnvFilter,
    format: LogFormat,
    writer: W,
) -> tracing::Dispatch
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(fmt_layer(format, writer, false))
        .with(filter)
        .into()
}
