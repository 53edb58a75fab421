//! OpenTelemetry traces and W3C trace context.
//!
//! With `--otlp-endpoint`, the `tracing` spans the gateway already opens are exported over
//! OTLP/HTTP (protobuf) by a batch processor on its own thread, never on a request's path:
//! one `request` span per MCP request (session, method, tool, outcome), an `upstream` child
//! for the time the upstream took, and `store.write` children for the writes a request
//! waits on. A client's `traceparent` HTTP header becomes the parent of the front door's
//! `mcp.http` span, `params._meta.traceparent` (as MCP SDKs send it) that of `request`; the upstream call's context goes on to every upstream in
//! `params._meta` and to HTTP upstreams in the `traceparent` header too.
//!
//! Without an endpoint nothing is exported and no context is minted: a client's
//! `_meta.traceparent` passes through untouched. Must not: block a request on export, or
//! put tool arguments or results in a span.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The running exporter; [`Telemetry::shutdown`] flushes what is still queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Builds the exporter for `endpoint` (an OTLP/HTTP base such as
    /// `http://collector:4318`, or the full `.../v1/traces` URL) and the `tracing` layer
    /// that feeds it.
    pub fn start<S>(
        endpoint: &str,
    ) -> anyhow::Result<(
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
        Telemetry,
    )>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig as _;
        let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("tether")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tether");
        Ok((
            tracing_opentelemetry::layer().with_tracer(tracer),
            Telemetry { provider },
        ))
    }

    /// Exports what is queued and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("tether: exporting the last traces failed: {e}");
        }
    }
}

fn extract(carrier: &HashMap<String, String>) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the trace a client's HTTP headers carry, if any.
pub fn adopt_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) -> bool {
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| {
            let v = headers.get(k)?.to_str().ok()?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    match extract(&carrier) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// Makes `span` a child of the trace in a message's `params._meta`, if any.
pub fn adopt_meta(span: &tracing::Span, meta: &serde_json::Map<String, Value>) -> bool {
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), meta.get(k)?.as_str()?.to_owned())))
        .collect();
    match extract(&carrier) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// Puts `span`'s trace context into a request's `params._meta` (`traceparent`, and
/// `tracestate` when there is one), when spans are exported. Without an exporter the span
/// has no context and the message is left as the client sent it.
pub fn inject_meta(span: &tracing::Span, message: &mut crate::wire::Message) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() || message.params().is_none() {
        return;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    message.edit_params(|params| {
        let meta = params
            .entry("_meta")
            .or_insert_with(|| Value::Object(Default::default()));
        let Some(meta) = meta.as_object_mut() else {
            return false;
        };
        for (k, v) in carrier {
            meta.insert(k, Value::String(v));
        }
        true
    });
}

/// The `traceparent` (and `tracestate`) of a message's `params._meta`, for the headers of
/// the HTTP request that carries it.
pub fn meta_headers(message: &Value) -> impl Iterator<Item = (&'static str, &str)> {
    let meta = message.pointer("/params/_meta");
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(move |k| Some((k, meta?.get(k)?.as_str()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn without_an_exporter_messages_pass_untouched() {
        let span = tracing::info_span!("x");
        let mut m =
            crate::wire::Message::request(json!(1), "tools/call", Some(json!({"name": "a"})));
        inject_meta(&span, &mut m);
        assert_eq!(m.params().map(|p| p.get()), Some(r#"{"name":"a"}"#));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let m = json!({"params": {"_meta": {"traceparent": tp}}});
        assert_eq!(meta_headers(&m).collect::<Vec<_>>(), [("traceparent", tp)]);
        assert!(extract(&HashMap::from([("traceparent".to_owned(), tp.to_owned())])).is_some());
        assert!(
            extract(&HashMap::from([(
                "traceparent".to_owned(),
                "garbage".to_owned()
            )]))
            .is_none()
        );
    }
}
