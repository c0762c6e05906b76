//! `Ingest` over the real gRPC server: a 10,000-message stream with interleaved
//! devices and retried `seq` numbers is answered in order, one response per request
//! and one verdict per sample, and every verdict equals an independent naive
//! reference of the engine semantics (`docs/architecture.md`, "Engine semantics"):
//! two-pass mean and population stddev of the window before the value.

use std::collections::HashMap;

use crate::common::{TestServer, drain, one, run_ingest, sample};
use tidewatch_proto::v1::{IngestRequest, Sample, Verdict};

const WINDOW: usize = 50;
const MIN_SAMPLES: usize = 5;
const THRESHOLD: f64 = 2.0;

/// What the reference expects for one metric value.
#[derive(Debug, Clone, Copy)]
struct Expected {
    mean: f64,
    stddev: f64,
    z: f64,
    anomaly: bool,
    n: usize,
}

/// The naive reference: the full history of every (device, metric), the window taken
/// as its last `WINDOW` values, statistics by two passes over it.
#[derive(Default)]
struct Reference {
    history: HashMap<(String, String), Vec<f64>>,
    last_seq: HashMap<String, u64>,
}

impl Reference {
    fn judge(values: &[f64], x: f64) -> Expected {
        let window = &values[values.len().saturating_sub(WINDOW)..];
        let n = window.len();
        let (mean, stddev) = if n == 0 {
            (0.0, 0.0)
        } else {
            // Sum the deviations from the first value: the plain sum of fifty values
            // near 1e9 alone is off by more than 1e-9 of a z-score.
            let first = window[0];
            let mean = first + window.iter().map(|v| v - first).sum::<f64>() / n as f64;
            let var = window.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            (mean, var.sqrt())
        };
        let (z, anomaly) = if n < MIN_SAMPLES {
            (0.0, false)
        } else if stddev == 0.0 {
            if x == mean {
                (0.0, false)
            } else if x > mean {
                (f64::INFINITY, true)
            } else {
                (f64::NEG_INFINITY, true)
            }
        } else {
            let z = (x - mean) / stddev;
            (z, z.abs() > THRESHOLD)
        };
        Expected {
            mean,
            stddev,
            z,
            anomaly,
            n,
        }
    }

    /// `None` for a duplicate; otherwise the expectation per metric (in the sample's
    /// metric order), with the values applied.
    fn apply(&mut self, s: &Sample) -> Option<Vec<(String, f64, Expected)>> {
        let last = self.last_seq.entry(s.device_id.clone()).or_default();
        if s.seq > 0 && s.seq <= *last {
            return None;
        }
        if s.seq > 0 {
            *last = s.seq;
        }
        let mut out = Vec::new();
        for (metric, &x) in &s.metrics {
            let values = self
                .history
                .entry((s.device_id.clone(), metric.clone()))
                .or_default();
            out.push((metric.clone(), x, Self::judge(values, x)));
            values.push(x);
        }
        Some(out)
    }
}

/// Relative closeness at 1e-9, with 1.0 as the magnitude below which it is absolute.
fn close(got: f64, want: f64) -> bool {
    if want.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= 1e-9 * want.abs().max(1.0)
}

fn check(verdict: &Verdict, sample: &Sample, expected: Option<Vec<(String, f64, Expected)>>) {
    let at = format!("device {} seq {}", sample.device_id, sample.seq);
    assert_eq!(verdict.device_id, sample.device_id, "{at}");
    assert_eq!(verdict.seq, sample.seq, "{at}");
    assert!(verdict.error.is_empty(), "{at}: {}", verdict.error);
    let Some(expected) = expected else {
        assert!(verdict.duplicate, "{at}: expected a duplicate");
        assert!(verdict.metrics.is_empty() && !verdict.anomaly, "{at}");
        return;
    };
    assert!(!verdict.duplicate, "{at}: not a duplicate");
    assert_eq!(verdict.metrics.len(), expected.len(), "{at}");
    let mut any = false;
    for (metric, x, want) in expected {
        let got = verdict
            .metrics
            .iter()
            .find(|m| m.metric == metric)
            .unwrap_or_else(|| panic!("{at}: no verdict for {metric}"));
        assert_eq!(got.value, x, "{at} {metric}");
        assert_eq!(got.window_count as usize, want.n, "{at} {metric}");
        assert!(
            close(got.mean, want.mean),
            "{at} {metric}: mean {} vs {}",
            got.mean,
            want.mean
        );
        assert!(
            close(got.stddev, want.stddev),
            "{at} {metric}: stddev {} vs {}",
            got.stddev,
            want.stddev
        );
        assert!(
            close(got.z_score, want.z),
            "{at} {metric}: z {} vs {}",
            got.z_score,
            want.z
        );
        // A z-score within rounding of the threshold may fall either way.
        if (want.z.abs() - THRESHOLD).abs() > 1e-6 {
            assert_eq!(got.anomaly, want.anomaly, "{at} {metric}: z {}", want.z);
        }
        any |= got.anomaly;
    }
    assert_eq!(verdict.anomaly, any, "{at}: sample anomaly is the OR");
}

/// Deterministic pseudo-random numbers in [0, 1) (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 10,000 messages of one to three samples: five devices interleaved, some with
/// `seq` and retries of old `seq` numbers, one with a flat signal and steps, values
/// from 1e-3 to 1e9 in magnitude and occasional spikes.
fn workload() -> Vec<IngestRequest> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut seqs: HashMap<&str, u64> = HashMap::new();
    let mut messages = Vec::with_capacity(10_000);
    for i in 0..10_000u64 {
        let count = 1 + (i % 3) as usize;
        let mut samples = Vec::with_capacity(count);
        for j in 0..count {
            let device = ["gateway-1", "sensor-2", "edge-3", "flat-4", "big-5"]
                [((i as usize) * 7 + j * 3) % 5];
            let spike = rng.next() < 0.02;
            let metrics: Vec<(&str, f64)> = match device {
                "gateway-1" => vec![
                    (
                        "rps",
                        420.0 + 30.0 * rng.next() + if spike { 500.0 } else { 0.0 },
                    ),
                    ("cpu", 0.5 + 0.1 * rng.next()),
                ],
                "sensor-2" => vec![("temp.c", -20.0 + 5.0 * rng.next())],
                "edge-3" => vec![
                    ("lat_ms", 0.001 * (1.0 + rng.next())),
                    ("err:rate", if spike { 9.0 } else { rng.next() }),
                ],
                // Long flat stretches: stddev 0 exactly, then a step (±inf z).
                "flat-4" => vec![("level", if i % 400 < 350 { 7.0 } else { 8.0 })],
                _ => vec![("bytes", 1e9 + 1e3 * rng.next())],
            };
            // Every device but gateway-1 numbers its samples; every 50th message
            // of sensor-2 and big-5 retries an old seq.
            let seq = if device == "gateway-1" {
                0
            } else {
                let next = seqs.entry(device).or_default();
                if i % 50 == 0 && *next > 3 && device != "edge-3" {
                    *next - 2
                } else {
                    *next += 1;
                    *next
                }
            };
            samples.push(sample(device, seq, &metrics));
        }
        messages.push(IngestRequest {
            samples,
            ..IngestRequest::default()
        });
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_match_the_reference_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let messages = workload();
    let mut stream = client
        .ingest(tokio_stream::iter(messages.clone()))
        .await
        .expect("ingest")
        .into_inner();
    let (responses, status) = drain(&mut stream).await;
    assert!(status.is_none(), "stream ended with {status:?}");
    assert_eq!(responses.len(), messages.len(), "one response per request");

    let mut reference = Reference::default();
    let (mut duplicates, mut anomalies, mut flat_anomalies) = (0, 0, 0);
    for (request, response) in messages.iter().zip(&responses) {
        assert_eq!(
            response.verdicts.len(),
            request.samples.len(),
            "one verdict per sample"
        );
        for (s, verdict) in request.samples.iter().zip(&response.verdicts) {
            let expected = reference.apply(s);
            duplicates += usize::from(expected.is_none());
            anomalies += usize::from(verdict.anomaly);
            flat_anomalies += usize::from(
                verdict.anomaly && verdict.metrics.iter().any(|m| m.z_score.is_infinite()),
            );
            check(verdict, s, expected);
        }
    }
    // The workload exercises what it claims to.
    assert!(duplicates > 50, "{duplicates} duplicates");
    assert!(anomalies > 100, "{anomalies} anomalies");
    assert!(
        flat_anomalies > 10,
        "{flat_anomalies} anomalies of a flat window"
    );

    // The windows the server kept are the reference's last WINDOW values.
    let stats = server.state.engine.analyze("sensor-2").expect("sensor-2");
    let values = &reference.history[&("sensor-2".to_string(), "temp.c".to_string())];
    let window = &values[values.len() - WINDOW..];
    let mean = window.iter().sum::<f64>() / WINDOW as f64;
    assert_eq!(stats.metrics[0].window_count as usize, WINDOW);
    assert!(close(stats.metrics[0].rolling_average, mean));
    assert_eq!(stats.last_seq, reference.last_seq["sensor-2"]);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_devices_have_separate_windows() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // Device a sees the seed series, device b a flat 1.0 between each of a's values;
    // one device never disturbs the other's window.
    let mut requests = Vec::new();
    for v in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0] {
        requests.push(one("a", 0, &[("rps", v)]));
        requests.push(one("b", 0, &[("rps", 1.0)]));
    }
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert!(status.is_none(), "{status:?}");
    let verdicts: Vec<&Verdict> = responses.iter().map(|r| &r.verdicts[0]).collect();
    assert_eq!(verdicts.len(), 12);
    for (i, v) in verdicts.iter().enumerate() {
        assert_eq!(v.device_id, if i % 2 == 0 { "a" } else { "b" });
        assert_eq!(v.metrics[0].window_count as usize, i / 2);
    }
    let seed = &verdicts[10].metrics[0];
    assert!(verdicts[10].anomaly);
    assert_eq!(seed.mean, 425.0);
    assert!((seed.z_score - 47.5).abs() < 1e-9, "{}", seed.z_score);
    let flat = &verdicts[11].metrics[0];
    assert!(!verdicts[11].anomaly);
    assert_eq!((flat.mean, flat.stddev, flat.z_score), (1.0, 0.0, 0.0));
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_seq_is_flagged_and_leaves_the_window_alone() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let requests = vec![
        one("d", 1, &[("x", 10.0)]),
        one("d", 2, &[("x", 20.0)]),
        one("d", 3, &[("x", 30.0)]),
        // A client retrying after a reconnect re-sends 2 and 3 with other values.
        one("d", 2, &[("x", 1e6)]),
        one("d", 3, &[("x", 1e6)]),
        // seq 0 is "none": always applied.
        one("d", 0, &[("x", 40.0)]),
        one("d", 4, &[("x", 50.0)]),
        // Another device's seq numbers are its own.
        one("e", 1, &[("x", 1.0)]),
        // A batch with a duplicate inside: each sample judged on its own.
        IngestRequest {
            samples: vec![
                sample("d", 5, &[("x", 60.0)]),
                sample("d", 5, &[("x", 1e6)]),
                sample("d", 6, &[("x", 70.0)]),
            ],
            ..IngestRequest::default()
        },
    ];
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert!(status.is_none(), "{status:?}");
    let verdicts: Vec<&Verdict> = responses.iter().flat_map(|r| &r.verdicts).collect();
    let duplicate: Vec<bool> = verdicts.iter().map(|v| v.duplicate).collect();
    assert_eq!(
        duplicate,
        [
            false, false, false, true, true, false, false, false, false, true, false
        ]
    );
    let seqs: Vec<u64> = verdicts.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 2, 3, 0, 4, 1, 5, 5, 6]);
    for v in verdicts.iter().filter(|v| v.duplicate) {
        assert!(v.metrics.is_empty() && !v.anomaly && v.error.is_empty());
    }
    // The window holds 10..=70 only: no 1e6 got in.
    let stats = server.state.engine.analyze("d").expect("d");
    assert_eq!(stats.last_seq, 6);
    let x = &stats.metrics[0];
    assert_eq!(x.window_count, 7);
    assert_eq!(x.rolling_average, 40.0);
    assert_eq!(x.last_value, 70.0);
    server.stop().await.expect("clean shutdown");
}

/// A host that mounts the generated `TelemetryServiceServer` itself (instead of
/// `TelemetryApi::into_server`, which routes `Ingest` through the server's own codec)
/// gets the same answers through the prost types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_server_answers_ingest_the_same() {
    use std::sync::Arc;

    use tidewatch_proto::v1::{
        telemetry_service_client::TelemetryServiceClient,
        telemetry_service_server::TelemetryServiceServer,
    };
    use tidewatch_server::{AppState, config::Config, grpc::TelemetryApi};

    let state = Arc::new(AppState::new(Config::defaults()).expect("state"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TelemetryServiceServer::new(TelemetryApi::new(state)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut generated = TelemetryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let reference = TestServer::start().await;
    let mut routed = reference.client().await;
    let requests: Vec<IngestRequest> = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]
        .iter()
        .enumerate()
        .map(|(i, &v)| one("seed", i as u64 + 1, &[("rps", v), ("cpu", v / 10.0)]))
        .chain([one("seed", 3, &[("rps", 1.0)]), one("seed", 0, &[])])
        .collect();
    let (a, status_a) = run_ingest(&mut generated, requests.clone()).await;
    let (b, status_b) = run_ingest(&mut routed, requests).await;
    assert_eq!(
        (status_a.map(|s| s.code()), status_b.map(|s| s.code())),
        (None, None)
    );
    assert_eq!(a, b, "the same verdicts through either path");
    assert!(
        a[5].verdicts[0].anomaly,
        "the seed check: 900 is an anomaly"
    );
    assert!(a[6].verdicts[0].duplicate);
    assert!(a[7].verdicts[0].error.starts_with("no_metrics"));
    server.abort();
}
