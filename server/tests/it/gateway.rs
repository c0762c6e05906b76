//! The HTTP/JSON gateway over real HTTP against the real server on `127.0.0.1:0`: the
//! request shapes (canonical, the two flat seed shapes, arrays, `{"samples":[...]}`,
//! NDJSON), the seed check, `/analyze`, refused bodies that ingest nothing, probes,
//! readiness during shutdown, and verdict JSON byte-identical to gRPC's.

use crate::common::{TestServer, http_get, http_post, ingest_json, one, sample};
use serde_json::{Value, json};
use tidewatch_proto::v1::{IngestRequest, IngestResponse, Sample};
use tidewatch_server::telemetry::Transport;
use tokio_stream::StreamExt;

/// The single verdict of an ingest answer.
fn only_verdict(body: &Value) -> &Value {
    let verdicts = body["verdicts"].as_array().expect("verdicts array");
    assert_eq!(verdicts.len(), 1, "{body}");
    &verdicts[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_check_over_rest() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let mut last = Value::Null;
    for (i, rps) in [420, 430, 410, 440, 425, 900].into_iter().enumerate() {
        // The seed's first flat shape; `/metric` is the seed's alias of `/ingest`.
        let path = if i % 2 == 0 { "/ingest" } else { "/metric" };
        let body = format!(r#"{{"timestamp": 1710000000, "cpu": 55.0, "rps": {rps}}}"#);
        let answer = http_post(addr, path, Some("application/json"), body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        let verdict = only_verdict(&body);
        assert_eq!(verdict["deviceId"], "default");
        assert_eq!(verdict["error"], "");
        assert_eq!(verdict["anomaly"], i == 5, "sample {i}: {verdict}");
        last = verdict.clone();
    }
    // Metrics come sorted by name: cpu, then rps.
    let rps = &last["metrics"][1];
    assert_eq!(rps["metric"], "rps");
    assert_eq!(rps["mean"], 425.0);
    assert_eq!(rps["windowCount"], 5);
    assert!((rps["stddev"].as_f64().unwrap() - 10.0).abs() < 1e-12);
    assert!(
        (rps["zScore"].as_f64().unwrap() - 47.5).abs() < 1e-9,
        "{rps}"
    );
    assert_eq!(last["metrics"][0]["anomaly"], false);

    // GET /analyze without a device: the default device, with the seed's flat fields.
    let answer = http_get(addr, "/analyze").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["deviceId"], "default");
    assert_eq!(body["source"], "SOURCE_MEMORY");
    assert_eq!(body["anomaly"], true);
    let expected_avg = (420.0 + 430.0 + 410.0 + 440.0 + 425.0 + 900.0) / 6.0;
    assert!((body["rps_avg"].as_f64().unwrap() - expected_avg).abs() < 1e-9);
    assert_eq!(body["cpu_avg"], 55.0);
    assert_eq!(body["metrics"][1]["metric"], "rps");
    assert_eq!(body["metrics"][1]["lastAnomaly"], true);
    assert_eq!(body["metrics"][1]["windowCount"], 6);
    assert!(
        body["updatedAt"]
            .as_str()
            .unwrap()
            .starts_with("2024-03-09T16:00:00"),
        "timestamp 1710000000 is the sample time: {body}"
    );
    assert_eq!(server.state.metrics.samples(Transport::Http), 6);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_shape() {
    let server = TestServer::start().await;
    let addr = server.http_addr;

    // Canonical proto3 JSON of one Sample (seq as a string, as proto3 JSON writes it).
    let answer = ingest_json(
        addr,
        r#"{"deviceId":"canon","time":"2024-01-15T10:30:00Z","metrics":{"temp":21.5},"seq":"3"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let v = only_verdict(&body);
    assert_eq!(
        (v["deviceId"].as_str(), v["seq"].as_str()),
        (Some("canon"), Some("3"))
    );
    assert_eq!(v["metrics"][0]["value"], 21.5);

    // The seed's second flat shape: device id and an RFC 3339 timestamp.
    let answer = ingest_json(
        addr,
        r#"{"timestamp": "2024-01-15T10:30:00Z", "device_id": "sensor-1", "cpu": 0.75, "rps": 150}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let v = only_verdict(&body);
    assert_eq!(v["deviceId"], "sensor-1");
    let metrics: Vec<_> = v["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["metric"].as_str().unwrap().to_string(),
                m["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        metrics,
        [("cpu".to_string(), 0.75), ("rps".to_string(), 150.0)]
    );
    let analyzed = http_get(addr, "/analyze?device_id=sensor-1").await.json();
    assert!(
        analyzed["updatedAt"]
            .as_str()
            .unwrap()
            .starts_with("2024-01-15T10:30:00"),
        "{analyzed}"
    );

    // An array mixing both shapes, answered in order; no Content-Type at all works too.
    let answer = http_post(
        addr,
        "/ingest",
        None,
        r#"[{"device_id":"mix","rps":1},{"deviceId":"mix","metrics":{"rps":2}},{"device_id":"other","rps":3}]"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let verdicts = body["verdicts"].as_array().unwrap();
    let seen: Vec<_> = verdicts
        .iter()
        .map(|v| {
            (
                v["deviceId"].as_str().unwrap(),
                v["metrics"][0]["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("mix", 1.0), ("mix", 2.0), ("other", 3.0)]);
    assert_eq!(verdicts[1]["metrics"][0]["windowCount"], 1);

    // The IngestRequest wrapper.
    let answer = ingest_json(
        addr,
        r#"{"samples":[{"deviceId":"wrap","metrics":{"a":1}},{"device_id":"wrap","a":2}]}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["verdicts"].as_array().unwrap().len(), 2);

    // A per-sample engine error is a verdict error with 200, not a refused request.
    let answer = ingest_json(
        addr,
        r#"[{"device_id":"bad","bad name!":1},{"device_id":"ok2","x":1}]"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert!(
        body["verdicts"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_metric_name:"),
        "{body}"
    );
    assert_eq!(body["verdicts"][1]["error"], "");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_bulk_ingest() {
    let server = TestServer::start().await;
    let lines: String = (1..=3000)
        .map(|i| {
            format!(
                "{{\"device_id\":\"bulk-{}\",\"seq\":{i},\"v\":{i}}}\n",
                i % 7
            )
        })
        .collect();
    let answer = http_post(
        server.http_addr,
        "/ingest",
        Some("application/x-ndjson"),
        lines,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let verdicts = body["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 3000);
    for (i, v) in verdicts.iter().enumerate() {
        let n = i + 1;
        assert_eq!(v["seq"], n.to_string());
        assert_eq!(v["deviceId"], format!("bulk-{}", n % 7));
        assert_eq!(v["error"], "");
    }
    assert_eq!(server.state.metrics.samples(Transport::Http), 3000);
    // The same body as plain JSON is not one document: refused.
    let again = http_post(
        server.http_addr,
        "/ingest",
        Some("application/json"),
        "{\"v\":1}\n{\"v\":2}\n",
    )
    .await;
    again.assert_error(400, "invalid_argument");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_known_and_unknown_devices() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    ingest_json(addr, r#"{"device_id":"known","rps":10}"#).await;
    let answer = http_get(addr, "/analyze?device_id=known").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["deviceId"], "known");
    assert_eq!(body["rps_avg"], 10.0);
    assert_eq!(body["anomaly"], false);
    assert_eq!(body["metrics"][0]["windowCount"], 1);
    // proto3 JSON's own field name works as the parameter too.
    assert_eq!(http_get(addr, "/analyze?deviceId=known").await.status, 200);

    let message = http_get(addr, "/analyze?device_id=nobody")
        .await
        .assert_error(404, "not_found");
    assert!(message.contains("nobody"), "{message}");
    // Without a device id it is the default device, which has no sample yet.
    http_get(addr, "/analyze")
        .await
        .assert_error(404, "not_found");
    http_get(addr, "/nope").await.assert_error(404, "not_found");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bodies_ingest_nothing() {
    let server = TestServer::start_with(|c| c.max_samples_per_request = 100).await;
    let addr = server.http_addr;
    let cases: [(&str, &str, u16, &str); 12] = [
        (
            "malformed JSON",
            r#"{"device_id":"r1","rps": 1"#,
            400,
            "invalid_argument",
        ),
        ("not JSON", "rps=1", 400, "invalid_argument"),
        ("empty body", "", 400, "invalid_argument"),
        (
            "string metric",
            r#"{"device_id":"r2","rps":"fast"}"#,
            400,
            "invalid_argument",
        ),
        (
            "metrics not a map",
            r#"{"deviceId":"r3","metrics":[1,2]}"#,
            400,
            "invalid_argument",
        ),
        ("array of numbers", "[1, 2, 3]", 400, "invalid_argument"),
        (
            "device id a number",
            r#"{"device_id":7,"rps":1}"#,
            400,
            "invalid_argument",
        ),
        // One bad sample refuses the whole array: the good first one is not ingested.
        (
            "bad second sample",
            r#"[{"device_id":"r4","rps":1},{"device_id":"r4","rps":true}]"#,
            400,
            "invalid_argument",
        ),
        (
            "NaN",
            r#"[{"device_id":"r5","rps":1},{"deviceId":"r5","metrics":{"rps":"NaN"}}]"#,
            400,
            "invalid_argument",
        ),
        (
            "Infinity",
            r#"{"deviceId":"r6","metrics":{"rps":"Infinity"}}"#,
            400,
            "invalid_argument",
        ),
        (
            "number out of range",
            r#"{"device_id":"r7","rps":1e999}"#,
            400,
            "invalid_argument",
        ),
        (
            "unknown canonical field",
            r#"{"deviceId":"r8","metrics":{"rps":1},"color":"red"}"#,
            400,
            "invalid_argument",
        ),
    ];
    for (what, body, status, code) in cases {
        let answer = ingest_json(addr, body).await;
        let message = answer.assert_error(status, code);
        eprintln!("{what}: {message}");
    }
    // A bad NDJSON line after good ones refuses the whole body, naming the line.
    let ndjson = "{\"device_id\":\"r9\",\"rps\":1}\n{\"device_id\":\"r9\",\"rps\":2}\n{oops}\n";
    let message = http_post(addr, "/ingest", Some("application/x-ndjson"), ndjson)
        .await
        .assert_error(400, "invalid_argument");
    assert!(message.contains("line 3"), "{message}");
    // More samples than MAX_SAMPLES_PER_REQUEST.
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"device_id": "r10", "rps": i}))
        .collect();
    let message = ingest_json(addr, &Value::Array(many).to_string())
        .await
        .assert_error(400, "invalid_argument");
    assert!(message.contains("MAX_SAMPLES_PER_REQUEST"), "{message}");
    // A 20 MB body: 413 with the JSON error body.
    let mut big = String::from("[");
    while big.len() < 20 * 1024 * 1024 {
        big.push_str(r#"{"device_id":"r11","rps":1.0},"#);
    }
    big.push_str(r#"{"device_id":"r11","rps":1.0}]"#);
    let message = ingest_json(addr, &big).await.assert_error(413, "too_large");
    assert!(message.contains("MAX_BODY_BYTES"), "{message}");
    // The same without Content-Length (chunked): refused once the bytes read pass it.
    let (tx, body) = crate::common::channel_body();
    let feeder = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b' '; 1024 * 1024]);
        for _ in 0..20 {
            if tx
                .send(Ok(hyper::body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let request = http::Request::post("/ingest")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    crate::common::http_send(addr, request)
        .await
        .assert_error(413, "too_large");
    feeder.abort();

    // Nothing of any of them was ingested.
    assert_eq!(server.state.metrics.samples(Transport::Http), 0);
    assert_eq!(server.state.engine.device_count(), 0);
    for id in [
        "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11", "default",
    ] {
        http_get(addr, &format!("/analyze?device_id={id}"))
            .await
            .assert_error(404, "not_found");
    }
    // Non-finite values count as rejected samples (both samples of the NaN body, one
    // of the Infinity body).
    let exposition = http_get(addr, "/metrics").await.text();
    let rejected = crate::common::metric_value(
        &exposition,
        "tidewatch_samples_rejected_total",
        &[("transport", "http"), ("reason", "invalid_value")],
    );
    assert_eq!(rejected, Some(3.0), "{exposition}");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    for path in ["/health", "/healthz"] {
        let answer = http_get(addr, path).await;
        assert_eq!(
            (answer.status, answer.json()),
            (200, json!({"status": "ok"}))
        );
    }
    let answer = http_get(addr, "/readyz").await;
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"status": "ready"}))
    );
    let answer = http_get(addr, "/metrics").await;
    assert_eq!(answer.status, 200);
    assert!(
        answer
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(
        answer
            .text()
            .contains("# TYPE tidewatch_samples_total counter")
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_draining() {
    // SHUTDOWN_DELAY keeps both servers up after readiness fails, as in Kubernetes.
    let mut server = TestServer::start_with(|c| {
        c.shutdown_delay = std::time::Duration::from_secs(60);
        c.shutdown_timeout = std::time::Duration::from_secs(120);
    })
    .await;
    let addr = server.http_addr;
    assert_eq!(http_get(addr, "/readyz").await.status, 200);
    server.begin_shutdown();
    // The shutdown signal is handled on the server's task: wait for it to land.
    let mut answer = http_get(addr, "/readyz").await;
    for _ in 0..500 {
        if answer.status != 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        answer = http_get(addr, "/readyz").await;
    }
    answer.assert_error(503, "unavailable");
    // Liveness holds, ingestion still works for clients the balancer has not moved yet,
    // and gRPC health says NOT_SERVING.
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    assert_eq!(ingest_json(addr, r#"{"rps":1}"#).await.status, 200);
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect health");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_gateway() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    assert_eq!(http_get(addr, "/readyz").await.status, 200);
    server.stop().await.expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the gateway still accepts connections after shutdown"
    );
}

/// Samples exercising every verdict field: warm-up, an anomaly, a flat window's
/// infinite z-score, a duplicate seq, a per-sample error, several metrics.
fn varied_samples() -> Vec<Sample> {
    let mut samples = Vec::new();
    for (i, v) in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]
        .into_iter()
        .enumerate()
    {
        samples.push(sample(
            "dev-a",
            i as u64 + 1,
            &[("rps", v), ("cpu", 0.5 + i as f64 / 10.0)],
        ));
    }
    for i in 0..6 {
        samples.push(sample("flat", 0, &[("t", if i < 5 { 7.0 } else { 8.25 })]));
    }
    samples.push(sample("dev-a", 3, &[("rps", 1.0)]));
    samples.push(sample("dev-b", 0, &[("bad name", 1.0)]));
    samples.push(sample("", 0, &[("x", 1e-300)]));
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_json_is_byte_identical_to_grpc() {
    let grpc_server = TestServer::start().await;
    let http_server = TestServer::start().await;
    let samples = varied_samples();
    // Half one message at a time, then the rest as one batch, on both transports.
    let batches: Vec<Vec<Sample>> = samples[..7]
        .iter()
        .map(|s| vec![s.clone()])
        .chain(std::iter::once(samples[7..].to_vec()))
        .collect();

    let mut client = grpc_server.client().await;
    let requests: Vec<IngestRequest> = batches
        .iter()
        .map(|b| IngestRequest {
            samples: b.clone(),
            ..IngestRequest::default()
        })
        .collect();
    let mut stream = client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("ingest")
        .into_inner();
    let mut grpc_json = Vec::new();
    while let Some(response) = stream.next().await {
        let response: IngestResponse = response.expect("response");
        grpc_json.push(serde_json::to_string(&response).expect("proto3 JSON"));
    }

    let mut rest_json = Vec::new();
    for batch in &batches {
        // The request body is the proto3 JSON of the same samples.
        let body = serde_json::to_string(batch).expect("samples JSON");
        let answer = ingest_json(http_server.http_addr, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        rest_json.push(answer.text());
    }
    assert_eq!(grpc_json.len(), batches.len());
    for (grpc, rest) in grpc_json.iter().zip(&rest_json) {
        assert_eq!(grpc, rest);
    }
    // The comparison covered the interesting cases.
    let all = rest_json.join("\n");
    for needle in [
        "\"anomaly\":true",
        "\"zScore\":\"Infinity\"",
        "\"duplicate\":true",
        "invalid_metric_name:",
        "\"deviceId\":\"default\"",
    ] {
        assert!(all.contains(needle), "missing {needle} in {all}");
    }
    grpc_server.stop().await.expect("clean shutdown");
    http_server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_share_the_windows() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .ingest(tokio_stream::iter(vec![one("shared", 1, &[("rps", 10.0)])]))
        .await
        .expect("ingest")
        .into_inner();
    while stream.next().await.is_some() {}
    let body = ingest_json(
        server.http_addr,
        r#"{"device_id":"shared","seq":2,"rps":20}"#,
    )
    .await
    .json();
    let v = only_verdict(&body);
    assert_eq!(v["metrics"][0]["windowCount"], 1);
    assert_eq!(v["metrics"][0]["mean"], 10.0);
    assert_eq!(server.state.metrics.samples(Transport::Grpc), 1);
    assert_eq!(server.state.metrics.samples(Transport::Http), 1);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_is_a_request_parameter() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let unknown = http_post(
        addr,
        "/ingest?detector=magic",
        Some("application/json"),
        r#"{"device_id":"d-1","rps":1}"#,
    )
    .await;
    let message = unknown.assert_error(400, "invalid_argument");
    assert!(message.contains("magic"), "{message}");
    assert_eq!(server.state.engine.device_count(), 0, "nothing ingested");

    // The same spike judged by the seed z-score and by the robust detector: both
    // answer, each with a score in [0, 1].
    for (device, query) in [("z-1", "/ingest"), ("r-1", "/ingest?detector=robust")] {
        let body: Vec<Value> = (0..60)
            .map(|i| json!({"device_id": device, "rps": 100 + (i % 7)}))
            .chain(std::iter::once(json!({"device_id": device, "rps": 900})))
            .collect();
        let answer = http_post(addr, query, Some("application/json"), body_of(&body)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let verdicts = answer.json()["verdicts"].as_array().unwrap().clone();
        assert_eq!(verdicts.len(), 61);
        let last = &verdicts[60];
        assert_eq!(last["anomaly"], true, "{query}: {last}");
        let score = last["score"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&score) && score > 0.5,
            "{query}: {last}"
        );
    }
    assert_eq!(server.state.engine.device_count(), 2);
    server.stop().await.expect("clean shutdown");
}

fn body_of(values: &[Value]) -> String {
    serde_json::to_string(values).expect("json")
}
