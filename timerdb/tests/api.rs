//! End to end through a real node started in this process (`timerdb::server::start`), and
//! through the `timerdb` CLI as a user runs it: what a client sends over gRPC and what
//! arrives on the JSON-lines sink.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{Node, b64, fire_counts, now_ms, request};
use timerdb::api::convert::timestamp;
use timerdb::config::Overrides;
use timerdb_proto::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_once_never_early_with_exact_content() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let mut client = node.client().await;
    let now = now_ms();
    let mut sent: HashMap<String, v1::SetTimeoutRequest> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..80u64 {
        // 0 ms to 3.9 s from now, plus past epochs (one at 1970 + 1 s).
        let fire = match i {
            0 => 1000,
            1..=4 => now - 3_600_000 * i,
            _ => now + (i * 50),
        };
        let mut r = request(
            fire,
            &format!("topic.{}", i % 3),
            (i % 5) as i32,
            &format!("payload {i} ✓"),
        );
        if i % 2 == 0 {
            r.key = Bytes::from(format!("user-{i}"));
        }
        if i % 3 == 0 {
            r.headers
                .insert("trace".into(), Bytes::from(vec![0, 1, 2, i as u8]));
            r.headers.insert("app".into(), Bytes::from_static(b"demo"));
        }
        if i % 2 == 0 {
            let id = client
                .set_timeout(r.clone())
                .await
                .unwrap()
                .into_inner()
                .timer_id;
            sent.insert(id, r);
        } else {
            batch.push(r);
        }
    }
    let results = client
        .set_timeouts(v1::SetTimeoutsRequest {
            timers: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), batch.len());
    for (res, r) in results.into_iter().zip(batch) {
        match res.result {
            Some(v1::set_timeout_result::Result::TimerId(id)) => {
                sent.insert(id, r);
            }
            other => panic!("batch item refused: {other:?}"),
        }
    }
    let ids: Vec<String> = sent.keys().cloned().collect();
    node.wait_fired(&ids, Duration::from_secs(30)).await;
    // Let any duplicate show up before counting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = node.fired();
    let counts = fire_counts(&lines);
    for line in &lines {
        let r = &sent[&line.timer_id];
        assert_eq!(
            counts[&line.timer_id], 1,
            "{} fired more than once",
            line.timer_id
        );
        let fire_at = r.fire_at.unwrap();
        let fire_at_ms = fire_at.seconds as u64 * 1000 + fire_at.nanos as u64 / 1_000_000;
        assert_eq!(line.fire_at_ms, fire_at_ms);
        assert!(line.fired_at_ms >= fire_at_ms, "fired early: {line:?}");
        assert_eq!(line.topic, r.topic);
        assert_eq!(line.partition, r.partition);
        assert_eq!(b64(&line.payload), r.payload.to_vec());
        let expected_key = if r.key.is_empty() {
            line.timer_id.as_bytes().to_vec()
        } else {
            r.key.to_vec()
        };
        assert_eq!(b64(&line.key), expected_key);
        let mut expected_headers: HashMap<String, Vec<u8>> = r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect();
        expected_headers.insert("timerdb-id".into(), line.timer_id.clone().into_bytes());
        expected_headers.insert(
            "timerdb-fire-at".into(),
            fire_at_ms.to_string().into_bytes(),
        );
        expected_headers.insert(
            "timerdb-fired-at".into(),
            line.fired_at_ms.to_string().into_bytes(),
        );
        let got: HashMap<String, Vec<u8>> = line
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), b64(v)))
            .collect();
        assert_eq!(got, expected_headers);
    }
    assert_eq!(counts.len(), sent.len());
    // A fired timer reads back as fired until its bucket is cleaned up, then as not found.
    let any = lines.last().unwrap().timer_id.clone();
    match client
        .get_timer(v1::GetTimerRequest { timer_id: any })
        .await
    {
        Ok(r) => assert_eq!(r.into_inner().state, v1::TimerState::Fired as i32),
        Err(s) => assert_eq!(s.code(), Code::NotFound),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_item_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let mut client = node.client().await;
    let now = now_ms();
    let timers = vec![
        request(now + 200, "good", 0, "a"),
        request(now + 200, "bad topic!", 0, "b"),
        request(now + 300, "good", 1, "c"),
    ];
    let results = client
        .set_timeouts(v1::SetTimeoutsRequest { timers })
        .await
        .unwrap()
        .into_inner()
        .results;
    let id = |i: usize| match &results[i].result {
        Some(v1::set_timeout_result::Result::TimerId(id)) => id.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let (a, c) = (id(0), id(2));
    match &results[1].result {
        Some(v1::set_timeout_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.contains("timers[1].topic"), "{}", e.message);
        }
        other => panic!("item 1 should be refused: {other:?}"),
    }
    let lines = node.wait_fired(&[a, c], Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.fired().len(),
        2,
        "only the two good items fire: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(
        dir.path(),
        Overrides {
            max_batch: Some(3),
            max_payload_bytes: Some(16),
            ..Overrides::default()
        },
    )
    .await;
    let mut client = node.client().await;
    let now = now_ms();
    let ok = || request(now, "topic", 0, "x");
    let cases: Vec<(v1::SetTimeoutRequest, &str)> = vec![
        (
            v1::SetTimeoutRequest {
                fire_at: None,
                ..ok()
            },
            "fire_at is required",
        ),
        (
            v1::SetTimeoutRequest {
                topic: "".into(),
                ..ok()
            },
            "not a valid Kafka topic",
        ),
        (
            v1::SetTimeoutRequest {
                topic: "a/b".into(),
                ..ok()
            },
            "not a valid Kafka topic",
        ),
        (
            v1::SetTimeoutRequest {
                topic: "t".repeat(250),
                ..ok()
            },
            "not a valid Kafka topic",
        ),
        (
            v1::SetTimeoutRequest {
                partition: -2,
                ..ok()
            },
            "partition -2 is negative",
        ),
        (
            v1::SetTimeoutRequest {
                payload: Bytes::from(vec![7u8; 17]),
                ..ok()
            },
            "max_payload_bytes",
        ),
        (
            v1::SetTimeoutRequest {
                fire_at: Some(prost_types::Timestamp {
                    seconds: -5,
                    nanos: 0,
                }),
                ..ok()
            },
            "out of range",
        ),
        (
            v1::SetTimeoutRequest {
                fire_at: Some(timestamp(now + 20 * 366 * 86_400_000)),
                ..ok()
            },
            "max_delay",
        ),
        (
            v1::SetTimeoutRequest {
                headers: [("timerdb-id".to_string(), Bytes::from_static(b"x"))].into(),
                ..ok()
            },
            "reserved prefix",
        ),
        (
            v1::SetTimeoutRequest {
                idempotency_key: "k".repeat(300),
                ..ok()
            },
            "max_idempotency_key_bytes",
        ),
    ];
    for (req, expect) in cases {
        let status = client.set_timeout(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expect),
            "{:?} should mention {expect}",
            status.message()
        );
    }
    let status = client
        .set_timeouts(v1::SetTimeoutsRequest {
            timers: vec![ok(), ok(), ok(), ok()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_batch"),
        "{}",
        status.message()
    );

    for bad in ["", "nope", "0123456789abcdef0123456789abcdeg"] {
        let s = client
            .get_timer(v1::GetTimerRequest {
                timer_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s = client
            .cancel_timeout(v1::CancelTimeoutRequest {
                timer_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
    }
    let unknown = format!("{:016x}{:016x}", now - now % 1000, 12345u64);
    let s = client
        .get_timer(v1::GetTimerRequest {
            timer_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = client
        .cancel_timeout(v1::CancelTimeoutRequest { timer_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // Nothing refused was stored: a control timer fires and nothing else does.
    let control = client
        .set_timeout(ok())
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    node.wait_fired(std::slice::from_ref(&control), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = node.fired();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].timer_id, control);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_timers_never_fire_whether_loaded_or_not() {
    let dir = tempfile::tempdir().unwrap();
    // Lookahead 2 s: a timer 1.5 s out is in memory at once, one 5 s out is not yet.
    let node = Node::embedded(
        dir.path(),
        Overrides {
            lookahead: Some("2s".into()),
            ..Overrides::default()
        },
    )
    .await;
    let mut client = node.client().await;
    let now = now_ms();
    let set = |r: v1::SetTimeoutRequest| {
        let mut c = client.clone();
        async move { c.set_timeout(r).await.unwrap().into_inner().timer_id }
    };
    let loaded = set(request(now + 1500, "t", 0, "loaded")).await;
    let not_loaded = set(request(now + 5000, "t", 0, "not loaded")).await;
    let control = set(request(now + 5500, "t", 0, "control")).await;
    for id in [&loaded, &not_loaded] {
        let r = client
            .cancel_timeout(v1::CancelTimeoutRequest {
                timer_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.cancelled);
        let again = client
            .cancel_timeout(v1::CancelTimeoutRequest {
                timer_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!again.cancelled, "second cancel reports already cancelled");
        let got = client
            .get_timer(v1::GetTimerRequest {
                timer_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.state, v1::TimerState::Cancelled as i32);
    }
    node.wait_fired(std::slice::from_ref(&control), Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired: Vec<String> = node.fired().into_iter().map(|l| l.timer_id).collect();
    assert_eq!(fired, vec![control.clone()]);
    // Too late to cancel a fired timer.
    let s = client
        .cancel_timeout(v1::CancelTimeoutRequest { timer_id: control })
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::FailedPrecondition | Code::NotFound),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_returns_the_first_id_and_fires_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let mut client = node.client().await;
    let now = now_ms();
    let r = v1::SetTimeoutRequest {
        idempotency_key: "checkout-1234".into(),
        ..request(now + 800, "orders", 2, "remind")
    };
    let first = client
        .set_timeout(r.clone())
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    let second = client
        .set_timeout(r.clone())
        .await
        .unwrap()
        .into_inner()
        .timer_id;
    let in_batch = client
        .set_timeouts(v1::SetTimeoutsRequest { timers: vec![r] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(
        in_batch.results[0].result,
        Some(v1::set_timeout_result::Result::TimerId(first.clone()))
    );
    node.wait_fired(std::slice::from_ref(&first), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(node.fired().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_an_abandoned_call_fires_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let mut client = node.client().await;
    let mut ids = Vec::new();
    let mut abandoned = 0;
    for i in 0..300u64 {
        let r = v1::SetTimeoutRequest {
            idempotency_key: format!("abandoned-{i}"),
            ..request(now_ms() + 1000, "retries", 0, &format!("retry-{i}"))
        };
        // A deadline shorter than the write: the client gives up during the call, after
        // the write may have committed and before the answer.
        let mut first = tonic::Request::new(r.clone());
        first.set_timeout(Duration::from_micros(500 + 400 * (i % 10)));
        if client.set_timeout(first).await.is_err() {
            abandoned += 1;
        }
        let id = client.set_timeout(r).await.unwrap().into_inner().timer_id;
        ids.push(id);
    }
    eprintln!("{abandoned} of 300 first calls abandoned by their deadline");
    assert!(abandoned > 0, "no call was cut off; the test shows nothing");
    node.wait_fired(&ids, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = fire_counts(&node.fired());
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "timer {id} fired once");
    }
    assert_eq!(counts.len(), ids.len(), "nothing else fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: "".into(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"timerdb.v1.TimerService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

/// The client commands take `--server host:port` as well as a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_and_reads_timers_through_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "timerdb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let server = node.grpc.to_string();
    let id = cli(&[
        "set-timeout",
        "--server",
        &server,
        "--in",
        "1s",
        "--topic",
        "cli",
        "--payload",
        "hi",
    ]);
    let id = id.trim();
    let shown = cli(&["get", id, "--server", &server]);
    assert!(shown.contains("pending"), "{shown}");
    let url = format!("http://{server}");
    let lines = node
        .wait_fired(&[id.to_string()], Duration::from_secs(20))
        .await;
    assert_eq!(b64(&lines[0].payload), b"hi");
    let shown = cli(&["get", id, "--server", &url]);
    assert!(shown.contains("fired"), "{shown}");
}

/// The client commands print one JSON object with `--json`, and an error as JSON too
/// (on stderr, exit status 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_answer_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let server = node.grpc.to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(args)
            .args(["--server", &server, "--json"])
            .output()
            .unwrap();
        let text = if out.status.success() {
            out.stdout
        } else {
            out.stderr
        };
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap_or_else(|e| {
            panic!("timerdb {args:?}: {e}: {}", String::from_utf8_lossy(&text))
        });
        (out.status.success(), v)
    };
    let (ok, set) = cli(&[
        "set-timeout",
        "--at",
        "1893456000000",
        "--topic",
        "cli-json",
        "--payload",
        "hey",
    ]);
    assert!(ok, "{set}");
    assert_eq!(set["fire_at_ms"], 1_893_456_000_000u64, "{set}");
    assert!(
        set["fire_at"]
            .as_str()
            .unwrap()
            .starts_with("2030-01-01T00:00:00"),
        "{set}"
    );
    let id = set["timer_id"].as_str().unwrap().to_owned();
    let (ok, got) = cli(&["get", &id]);
    assert!(ok, "{got}");
    assert_eq!(got["timer_id"], id.as_str());
    assert_eq!(got["state"], "pending");
    assert_eq!(got["topic"], "cli-json");
    assert_eq!(got["partition"], 0);
    assert_eq!(got["payload_size"], 3);
    assert_eq!(got["has_idempotency_key"], false);
    let (ok, cancelled) = cli(&["cancel", &id]);
    assert!(ok, "{cancelled}");
    assert_eq!(
        cancelled,
        serde_json::json!({"timer_id": id, "cancelled": true})
    );
    let (ok, again) = cli(&["cancel", &id]);
    assert!(ok, "{again}");
    assert_eq!(again["cancelled"], false);
    let (ok, err) = cli(&["get", "not-an-id"]);
    assert!(!ok);
    assert!(
        err["error"].as_str().unwrap().contains("not-an-id"),
        "{err}"
    );
}

/// A batch over the largest message the server takes gets `INVALID_ARGUMENT` naming the
/// limit (not a transport error), and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_message_limit_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(dir.path(), Overrides::default()).await;
    let mut client = node.client().await;
    let now = common::now_ms();
    // 140 timers of 500,000 bytes: 70 MB, over the 64 MiB a call may carry.
    let timers: Vec<v1::SetTimeoutRequest> = (0..140)
        .map(|i| v1::SetTimeoutRequest {
            payload: Bytes::from(vec![b'x'; 500_000]),
            ..common::request(now + 1000, "big", 0, &i.to_string())
        })
        .collect();
    let err = client
        .set_timeouts(v1::SetTimeoutsRequest { timers })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("67108864") && err.message().contains("split the batch"),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(node.fired().is_empty());
}

/// Two nodes in one process (`timerdb::server::start`), each on its own store, sink and
/// bound port: both take calls and fire, and each shuts down on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_in_one_process() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut nodes = Vec::new();
    for d in &dirs {
        let config = timerdb::config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            store: format!("embedded://{}", d.path().join("data").display()),
            sink: format!("jsonl://{}", d.path().join("fired.jsonl").display()),
            ..Default::default()
        };
        nodes.push(timerdb::server::start(config).await.unwrap());
    }
    assert_ne!(nodes[0].addr, nodes[1].addr);
    let mut ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut client =
            v1::timer_service_client::TimerServiceClient::connect(format!("http://{}", n.addr))
                .await
                .unwrap();
        let id = client
            .set_timeout(request(now_ms() + 500, "embedded", 0, &format!("node-{i}")))
            .await
            .unwrap()
            .into_inner()
            .timer_id;
        ids.push(id);
    }
    for (d, id) in dirs.iter().zip(&ids) {
        let path = d.path().join("fired.jsonl");
        let started = std::time::Instant::now();
        loop {
            let fired = common::read_fired(&path);
            if fired.iter().any(|l| &l.timer_id == id) {
                assert_eq!(fired.len(), 1, "only its own timer: {fired:?}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{id} never fired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// `timerdb serve --check` says whether a configuration would start, naming a bad setting,
/// and opens nothing: no store directory appears, no port is bound.
#[test]
fn serve_check_names_a_bad_setting_and_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("data");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_timerdb"))
            .args(["serve", "--check", "--store"])
            .arg(format!("embedded://{}", store.display()))
            .args(extra)
            .env_remove("TIMERDB_CONFIG")
            .output()
            .unwrap()
    };
    let ok = run(&["--lookahead", "3s", "--sink", "kafka://127.0.0.1:1"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8(ok.stdout).unwrap();
    assert!(text.starts_with("configuration valid"), "{text}");
    assert!(text.contains("lookahead         3s"), "{text}");
    assert!(
        text.contains("sink              kafka://127.0.0.1:1"),
        "{text}"
    );
    assert!(text.contains("cluster           none"), "{text}");
    let bad = run(&["--lookahead", "soon"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("lookahead"), "{err}");
    let member = run(&["--node-id", "1", "--initial-members", "1=127.0.0.1:7420"]);
    assert_eq!(
        member.status.code(),
        Some(1),
        "a cluster needs the shared store"
    );
    assert!(!store.exists(), "--check must not create the store");
}
