use super::*;

/// The configured headers of an HTTP upstream (an `mcpServers` entry's `headers`, or
/// `--upstream-header`) go with its requests, the probe of `auto` included.
#[tokio::test]
async fn an_http_upstreams_configured_headers_reach_it() {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: reqwest::header::HeaderMap| {
            let log = log.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                log.lock().unwrap().push(auth);
                axum::http::StatusCode::NOT_FOUND
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let tracker = TaskTracker::new();
    let c = Connector::new(
        UpstreamSpec::Http {
            url,
            protocol: UpstreamProtocol::Auto,
            headers: vec![("Authorization".into(), "Bearer t".into())],
        },
        "h",
        None,
        UpstreamLimits::default(),
        tracker.clone(),
    );
    let r = c
        .start("s", &serde_json::json!({}), 1, Duration::from_secs(5))
        .await;
    assert!(r.is_err(), "the server answers 404 to everything");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "the probe and the initialize: {seen:?}");
    assert!(
        seen.iter().all(|a| a.as_deref() == Some("Bearer t")),
        "{seen:?}"
    );
    tracker.close();
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_after_consecutive_failures_and_probes_with_a_growing_wait() {
    let c = Circuit::new("t", 3, Duration::from_secs(10));
    let err = UpstreamError::Closed("exited at once".into());
    for _ in 0..2 {
        let a = c.admit().unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        c.failure(a, &err);
    }
    assert!(!c.is_open());
    let a = c.admit().unwrap();
    c.failure(a, &err);
    assert!(c.is_open());
    match c.admit() {
        Err(UpstreamError::CircuitOpen {
            failures, retry_in, ..
        }) => {
            assert_eq!(failures, 3);
            assert_eq!(retry_in, FIRST_PROBE, "the first probe comes soon");
        }
        other => panic!("{other:?}"),
    }
    // Each failed probe doubles the wait, up to the cooldown.
    let mut waits = Vec::new();
    for _ in 0..8 {
        let wait = match c.admit() {
            Err(UpstreamError::CircuitOpen { retry_in, .. }) => retry_in,
            other => panic!("{other:?}"),
        };
        waits.push(wait.as_millis());
        tokio::time::advance(wait).await;
        // Half-open: one start goes through, the others wait for its outcome.
        let probe = c.admit().unwrap();
        assert!(c.admit().is_err());
        c.failure(probe, &err);
    }
    assert_eq!(
        waits,
        [250, 500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = c.admit().unwrap();
    c.success(probe);
    assert!(!c.is_open());
    assert_eq!(c.failures().0, 0);
    c.admit().unwrap();
    assert_eq!(
        c.refused(),
        0,
        "the refusal count restarts when the circuit closes"
    );
}

/// Issue 26: eight sessions whose upstream went away all fail to restart at the same
/// moment. That is one failure, not eight: the circuit stays closed, and each later
/// failure (a start begun after the last one was known) counts.
#[tokio::test(start_paused = true)]
async fn failures_of_one_moment_count_once() {
    let c = Circuit::new("t", 5, Duration::from_secs(10));
    let err = UpstreamError::Closed("connection refused".into());
    let together: Vec<Attempt> = (0..8).map(|_| c.admit().unwrap()).collect();
    tokio::time::advance(Duration::from_millis(2)).await;
    for a in together {
        c.failure(a, &err);
    }
    assert_eq!(c.failures().0, 1);
    assert!(!c.is_open());
    for n in 2..=4 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        c.failure(a, &err);
        c.failure(b, &err);
        assert_eq!(c.failures().0, n);
    }
    assert!(!c.is_open());
}

/// An upstream back within a second of a crash loop opening the circuit is used within
/// about a second: the probe after the first wait succeeds and closes it.
#[tokio::test(start_paused = true)]
async fn an_upstream_back_soon_is_used_soon() {
    let c = Circuit::new("t", 2, Duration::from_secs(30));
    let err = UpstreamError::Closed("connection refused".into());
    for _ in 0..2 {
        let a = c.admit().unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
        c.failure(a, &err);
    }
    let opened = Instant::now();
    // The upstream comes back 900 ms after the circuit opened.
    let back = opened + Duration::from_millis(900);
    loop {
        match c.admit() {
            Ok(probe) if Instant::now() >= back => {
                c.success(probe);
                break;
            }
            Ok(probe) => c.failure(probe, &err),
            Err(UpstreamError::CircuitOpen { retry_in, .. }) => {
                tokio::time::advance(retry_in).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(!c.is_open());
    let used = Instant::now() - opened;
    assert!(
        used <= Duration::from_millis(1_750),
        "used {used:?} after opening"
    );
}

/// The gateway's own shortage (EMFILE) says nothing of the upstream: it is not counted,
/// and a probe that met it gives its turn back.
#[tokio::test(start_paused = true)]
async fn the_gateways_own_shortage_is_not_the_upstreams_failure() {
    let c = Circuit::new("t", 1, Duration::from_secs(10));
    let a = c.admit().unwrap();
    c.neutral(a);
    assert_eq!(c.failures().0, 0);
    let a = c.admit().unwrap();
    c.failure(a, &UpstreamError::Closed("refused".into()));
    assert!(c.is_open());
    tokio::time::advance(FIRST_PROBE).await;
    let probe = c.admit().unwrap();
    c.neutral(probe);
    let probe = c.admit().expect("the probe's turn was given back");
    c.success(probe);
    assert!(!c.is_open());
    let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
    assert!(gateway_exhausted(&emfile));
    let enoent = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32);
    assert!(!gateway_exhausted(&enoent));
}
