//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz) and their smoke test: every
//! parser that reads the network, an upstream or a config file, driven with arbitrary bytes.
//! Each function must return normally for any input; invariants worth checking are asserted.
//!
//! Must not: be used by the gateway itself (it exists for `cargo fuzz` and the parser tests).
#![doc(hidden)]

use bytes::BytesMut;
use tokio_util::codec::{Decoder, LinesCodec};

use crate::protocol;
use crate::wire::Message;
use crate::{config, policy, session};

/// A JSON-RPC message as a client POSTs it: parse, classify, and rewrite its id both ways.
pub fn envelope(data: &[u8]) {
    let Ok(env) = Message::parse(data) else {
        return;
    };
    let text = env.encode();
    let again = Message::parse(text.as_bytes()).expect("a parsed message re-parses");
    assert_eq!(again.kind(), env.kind());
    assert_eq!(again.to_value(), env.to_value());
    let _ = policy::classify_post(&env, None, None);
    let _ = policy::classify_post(&env, Some("abc"), Some("2025-11-25"));
    let _ = (
        env.method(),
        env.tool_name(),
        env.progress_token(),
        env.params(),
    );
    let mut up = env.clone();
    up.set_id(serde_json::json!(7));
    let mut down = up;
    down.set_id(env.id().cloned().unwrap_or_default());
    let _ = protocol::call_outcome(&down);
    let _ = protocol::RestoreOp::of_message(&down);
}

/// A 2026-07-28 request as a client POSTs it: the body, then after a NUL byte its
/// `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers (NUL-separated); checked
/// against every modern rule, stripped for a legacy upstream, and a fake answer completed.
/// A refusal always has a 4xx status; no `requestState` made without the key verifies.
pub fn modern_request(data: &[u8]) {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (body, rest) = data.split_at(split);
    let text = String::from_utf8_lossy(rest.get(1..).unwrap_or_default()).into_owned();
    let mut parts = text.split('\0');
    let h = crate::modern::Headers {
        version: parts.next(),
        method: parts.next(),
        name: parts.next(),
    };
    let Ok(env) = Message::parse(body) else {
        return;
    };
    match crate::modern::check(&env, h) {
        Err(r) => assert!((400..500).contains(&r.status), "{r:?}"),
        Ok(meta) => {
            let _ = (
                meta.capabilities_key(),
                meta.init_params(),
                meta.declares("sampling"),
            );
            let method = env.method_name().unwrap_or_default().to_owned();
            let _ = crate::modern::Filter::of(&env);
            let mut value = env.to_value();
            if let Ok(retry) = crate::modern::to_legacy(&mut value) {
                let key = crate::modern::StateKey::new([1; 32]);
                if let Some(state) = retry.state {
                    // Without the key, no state a client makes up verifies.
                    assert!(key.open(&state, "p", &method, None, 0).is_err());
                }
            }
            let mut answer = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {}});
            crate::modern::complete(&method, &mut answer);
            assert_eq!(answer["result"]["resultType"], "complete");
        }
    }
}

/// Header values a client controls: session id, protocol version, Origin, Last-Event-ID,
/// and `tether connect`'s `Name: value` header lines. The input is split on NUL bytes.
pub fn headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let session_id = parts.next().unwrap_or("");
    let version = parts.next().unwrap_or("");
    let origin = parts.next().unwrap_or("");
    let last_event = parts.next().unwrap_or("");
    if policy::plausible_session_id(session_id) {
        assert!(session_id.len() <= 256);
    }
    let _ = policy::legacy_version(Some(version));
    let _ = policy::origin_allowed(origin, &[]);
    let _ = policy::origin_allowed(origin, &["https://app.example.com".to_owned()]);
    if let Some((stream, seq)) = session::parse_event_id(last_event) {
        // What we parse, we could have produced.
        assert_eq!(
            session::parse_event_id(&session::event_id(stream, seq)),
            Some((stream, seq))
        );
    }
    let lines: Vec<String> = parts.map(str::to_owned).collect();
    let _ = crate::connect::parse_headers(&lines);
}

/// What an upstream writes: newline-delimited JSON on stdio (split by the same bounded line
/// codec the stdio link uses) and SSE from an HTTP upstream (the same parser, fed in chunks
/// whose sizes come from the input).
pub fn upstream_stream(data: &[u8]) {
    let mut codec = LinesCodec::new_with_max_length(1024);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(line)) => {
                let _ = serde_json::from_str::<serde_json::Value>(&line);
            }
            Ok(None) => break,
            // Over-long line: the codec discards it and goes on, as the link does.
            Err(_) => {}
        }
    }
    let _ = codec.decode_eof(&mut buf);

    use futures::StreamExt;
    let split = data.first().map_or(7, |b| usize::from(*b % 31) + 1);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(split)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    // A small bound, so the fuzzer reaches the oversized paths too.
    let items = futures::executor::block_on(
        crate::upstream::sse::decode(futures::stream::iter(chunks), 256).collect::<Vec<_>>(),
    );
    for item in items.into_iter().flatten() {
        if let crate::upstream::sse::SseItem::Event(e) = item {
            assert!(
                e.data.len() <= 256,
                "an event past the bound was dispatched"
            );
            let _ = serde_json::from_str::<serde_json::Value>(&e.data);
            let _ = session::parse_event_id(&e.id);
        }
    }
}

/// A config file: parse, then resolve (all errors collected, nothing panics).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(layer) = toml::from_str::<config::Layer>(text) else {
        return;
    };
    let merged = config::Layer::default().overlay(layer);
    let _ = config::Config::resolve(merged, vec!["tether".into(), "demo-server".into()]);
}

#[cfg(test)]
mod tests {
    //! The CI smoke run of the fuzz targets: seeds plus deterministic mutations, a few
    //! thousand inputs per target in well under a second. The real runs use cargo-fuzz.

    type Target = fn(&[u8]);

    const SEEDS: &[&[u8]] = &[
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"},"_meta":{"progressToken":"p"}}}"#,
        br#"{"jsonrpc":"2.0","id":"x","result":{"content":[],"isError":true}}"#,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"requestState\":\"e30.AA\",\"inputResponses\":{},\"_meta\":{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{},\"io.modelcontextprotocol/logLevel\":\"info\"}}}\x002026-07-28\x00tools/call\x00=?base64?ZWNobw==?=",
        b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"subscriptions/listen\",\"params\":{\"notifications\":{\"toolsListChanged\":true},\"_meta\":{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{}}}}\x002026-07-28\x00subscriptions/listen",
        b"id: 9f2c.4\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\nretry: 1000\n\n",
        b"0123abcd\x002025-11-25\x00http://localhost:3000\x00abc.12\x00X-Api-Key: k\x00Bad",
        b"listen = \"127.0.0.1:0\"\ndemo = true\nstore = \"redis://127.0.0.1/\"\n[upstream]\nname = \"x\"\n",
        b"",
    ];

    fn mutate(seed: &[u8], state: &mut u64) -> Vec<u8> {
        let mut next = || {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state
        };
        let mut v = seed.to_vec();
        for _ in 0..(next() % 8) {
            let r = next();
            match r % 4 {
                0 if !v.is_empty() => {
                    let i = (r >> 8) as usize % v.len();
                    v[i] = (r >> 16) as u8;
                }
                1 => {
                    let i = (r >> 8) as usize % (v.len() + 1);
                    v.insert(i, (r >> 16) as u8);
                }
                2 if !v.is_empty() => {
                    let i = (r >> 8) as usize % v.len();
                    v.remove(i);
                }
                _ => {
                    let i = (r >> 8) as usize % (v.len() + 1);
                    let j = (r >> 24) as usize % (v.len() + 1);
                    let (a, b) = (i.min(j), i.max(j));
                    let dup = v[a..b].to_vec();
                    v.splice(b..b, dup);
                }
            }
        }
        v
    }

    #[test]
    fn every_fuzz_target_survives_seeds_and_mutations() {
        let targets: [(&str, Target); 5] = [
            ("envelope", super::envelope),
            ("modern_request", super::modern_request),
            ("headers", super::headers),
            ("upstream_stream", super::upstream_stream),
            ("config", super::config),
        ];
        for (name, target) in targets {
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            let mut runs = 0;
            for seed in SEEDS {
                target(seed);
                for _ in 0..500 {
                    target(&mutate(seed, &mut state));
                    runs += 1;
                }
            }
            assert!(runs >= 4000, "{name}");
        }
    }
}
