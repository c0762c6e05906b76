//! Abuse rows of issue 19 on engine memory, against the real binary: a stream asking
//! for the largest windows with the most metrics is bounded by `MEMORY_BUDGET` (and a
//! window above `MAX_STREAM_WINDOW` is refused), and a flood of junk device ids with
//! `MAX_DEVICES` reached does not lock out legitimate devices (probation eviction,
//! `docs/operations.md`, "Memory").

use std::{net::SocketAddr, time::Duration};

use tidewatch_proto::v1::{AnalyzeRequest, DetectorConfig, IngestRequest, Sample, Source, Verdict};
use tonic::Code;

use crate::common::{
    ServerProcess, connect, http_get, metric_value, redis_server::RedisServer, run_ingest, sample,
    verdicts_of,
};

/// The gateway's address, from the start-up log.
fn http_addr(process: &ServerProcess) -> SocketAddr {
    process
        .json_log()
        .iter()
        .find(|l| l["message"] == "http listening")
        .and_then(|l| l["http_addr"].as_str()?.parse().ok())
        .expect("http listening with its address")
}

/// A request of `samples`, with a detector section asking for `window` values.
fn request(samples: Vec<Sample>, window: u32) -> IngestRequest {
    IngestRequest {
        samples,
        detector: Some(DetectorConfig {
            name: "zscore".into(),
            window_size: window,
            ..DetectorConfig::default()
        }),
    }
}

/// A sample of `device` with 32 metrics.
fn wide_sample(device: &str, round: usize) -> Sample {
    let names: Vec<String> = (0..32).map(|m| format!("metric_{m:02}")).collect();
    let metrics: Vec<(&str, f64)> = names
        .iter()
        .enumerate()
        .map(|(m, n)| (n.as_str(), (round * 31 + m) as f64 % 97.0))
        .collect();
    sample(device, 0, &metrics)
}

/// RSS may exceed the budget by at most this much: the idle server, the streams and
/// buffers of the test, the value pool's free runs (an eighth of the values at most)
/// and the allocator's slack.
const RSS_SLACK: u64 = 48 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_of_4096_with_32_metrics_are_bounded_by_the_memory_budget() {
    let budget: u64 = 8 << 20;
    let process = ServerProcess::spawn(&[], &[("MEMORY_BUDGET", "8MiB")]);
    let mut client = connect(&process.grpc_url()).await;
    let http = http_addr(&process);
    // A device that was there before the attack (and came back: not on probation).
    let steady = vec![sample("steady", 0, &[("cpu", 1.0)]); 2];
    let before = verdicts_of(&mut client, vec![request(steady, 0)]).await;
    assert!(before.iter().all(|v| v.error.is_empty()));
    let idle_rss = process.rss_bytes();

    // Above MAX_STREAM_WINDOW (4,096 by default): the stream is refused whole.
    let (_, status) = run_ingest(
        &mut client,
        vec![request(vec![wide_sample("too-wide", 0)], 4097)],
    )
    .await;
    let status = status.expect("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("window_size 4097 is above the server's limit 4096 (MAX_STREAM_WINDOW)"),
        "{status:?}"
    );

    // The same over REST: 400, and nothing ingested.
    let rest = crate::common::http_post(
        http,
        "/ingest?window_size=4097",
        Some("application/json"),
        r#"{"device_id": "too-wide-rest", "cpu": 1}"#,
    )
    .await;
    let message = rest.assert_error(400, "invalid_argument");
    assert!(message.contains("MAX_STREAM_WINDOW"), "{message}");

    // 400 devices ask for 32 windows of 4,096 values each (1 MiB a device), two
    // samples each (so none is on probation): 7 fit the budget, the samples of the
    // rest are refused.
    let attack: Vec<Sample> = (0..400)
        .flat_map(|d| [0, 1].map(|r| wide_sample(&format!("wide-{d:03}"), r)))
        .collect();
    let verdicts = verdicts_of(&mut client, vec![request(attack, 4096)]).await;
    let mut admitted: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.error.is_empty())
        .map(|v| v.device_id.as_str())
        .collect();
    admitted.dedup();
    let refused: Vec<&Verdict> = verdicts.iter().filter(|v| !v.error.is_empty()).collect();
    assert_eq!(admitted.len(), 7);
    assert_eq!(2 * admitted.len() + refused.len(), 800);
    for v in &refused {
        assert!(
            v.error.starts_with("memory_budget: device \"wide-"),
            "{}",
            v.error
        );
        assert!(
            v.error
                .contains("of MEMORY_BUDGET (8388608 bytes) are in use"),
            "{}",
            v.error
        );
    }
    // Their windows filled to the last value: what the budget charged is what they hold.
    let admitted: Vec<String> = admitted.iter().map(|d| (*d).to_owned()).collect();
    for round in (2..4096).step_by(512) {
        let requests: Vec<IngestRequest> = (round..(round + 512).min(4096))
            .map(|r| request(admitted.iter().map(|d| wide_sample(d, r)).collect(), 4096))
            .collect();
        let verdicts = verdicts_of(&mut client, requests).await;
        assert!(
            verdicts.iter().all(|v| v.error.is_empty()),
            "{:?}",
            verdicts.iter().find(|v| !v.error.is_empty())
        );
    }
    let stats = client
        .analyze(AnalyzeRequest {
            device_id: admitted[0].clone(),
        })
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(
        (stats.metrics.len(), stats.metrics[0].window_count),
        (32, 4096)
    );

    let rss = process.rss_bytes();
    let exposition = http_get(http, "/metrics").await.text();
    let used = metric_value(&exposition, "tidewatch_memory_used_bytes", &[]).expect("used gauge");
    let limit =
        metric_value(&exposition, "tidewatch_memory_budget_bytes", &[]).expect("budget gauge");
    let shed = metric_value(
        &exposition,
        "tidewatch_load_shed_total",
        &[("transport", "grpc")],
    )
    .expect("load shed");
    let rejected = metric_value(
        &exposition,
        "tidewatch_samples_rejected_total",
        &[("transport", "grpc"), ("reason", "memory_budget")],
    )
    .expect("rejected by reason");
    eprintln!(
        "abuse_memory: {} devices of 32 x 4096 admitted; RSS idle {} MiB, full {} MiB; used {used} of {limit}",
        admitted.len(),
        idle_rss >> 20,
        rss >> 20
    );
    assert_eq!(limit, budget as f64);
    // Full: less than one more wide device (32 × 4,096 × 8 bytes and change) fits.
    assert!(used <= limit && used > limit - 1.1e6, "{used} of {limit}");
    assert_eq!(shed, refused.len() as f64);
    assert_eq!(rejected, refused.len() as f64);
    assert!(
        rss < idle_rss + budget + RSS_SLACK,
        "RSS {rss} bytes with a budget of {budget}"
    );

    // Nothing else is affected: the device from before goes on, and small new devices
    // still fit in what is left; another wide one is refused (nothing is on probation:
    // every wide device came back).
    let after = verdicts_of(
        &mut client,
        vec![request(
            vec![
                sample("steady", 0, &[("cpu", 2.0)]),
                sample("late", 0, &[("cpu", 1.0)]),
            ],
            0,
        )],
    )
    .await;
    assert!(after.iter().all(|v| v.error.is_empty()), "{after:?}");
    let wide = verdicts_of(
        &mut client,
        vec![request(vec![wide_sample("late-wide", 0)], 4096)],
    )
    .await;
    assert!(
        wide[0].error.starts_with("memory_budget"),
        "{}",
        wide[0].error
    );
    assert!(process.terminate().success());
}

/// 15,000 junk ids, one sample each, from one source.
fn junk(from: usize, count: usize) -> Vec<IngestRequest> {
    (from..from + count)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|ids| IngestRequest {
            samples: ids
                .iter()
                .map(|i| sample(&format!("junk-{i:05}"), 0, &[("x", 1.0)]))
                .collect(),
            detector: None,
        })
        .collect()
}

fn one_sample(device: &str, value: f64) -> Vec<IngestRequest> {
    vec![IngestRequest {
        samples: vec![sample(device, 0, &[("cpu", value)])],
        detector: None,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_ids_past_max_devices_do_not_lock_out_legitimate_devices() {
    let process = ServerProcess::spawn(&[], &[("MAX_DEVICES", "10000")]);
    let mut client = connect(&process.grpc_url()).await;
    let http = http_addr(&process);
    // A device that came back before the flood.
    for v in [1.0, 2.0] {
        assert!(
            verdicts_of(&mut client, one_sample("legit-old", v)).await[0]
                .error
                .is_empty()
        );
    }
    let flood = verdicts_of(&mut client, junk(0, 15_000)).await;
    assert_eq!(flood.len(), 15_000);
    // Junk evicts older junk: nothing is refused, and the table stays at MAX_DEVICES.
    assert!(
        flood.iter().all(|v| v.error.is_empty()),
        "{:?}",
        flood.iter().find(|v| !v.error.is_empty())
    );
    // A new legitimate device gets verdicts, and keeps them through another flood
    // once it has come back.
    for (round, v) in [1.0, 2.0].into_iter().enumerate() {
        let verdict = &verdicts_of(&mut client, one_sample("legit-new", v)).await[0];
        assert!(verdict.error.is_empty(), "round {round}: {}", verdict.error);
    }
    let flood = verdicts_of(&mut client, junk(15_000, 15_000)).await;
    assert!(flood.iter().all(|v| v.error.is_empty()));
    for device in ["legit-old", "legit-new"] {
        let verdict = &verdicts_of(&mut client, one_sample(device, 3.0)).await[0];
        assert!(verdict.error.is_empty(), "{device}: {}", verdict.error);
        assert_eq!(
            verdict.metrics[0].window_count, 2,
            "{device} kept its window"
        );
    }
    let exposition = http_get(http, "/metrics").await.text();
    let devices = metric_value(&exposition, "tidewatch_devices", &[]).expect("devices");
    let evicted = metric_value(
        &exposition,
        "tidewatch_devices_evicted_on_probation_total",
        &[],
    )
    .expect("evictions");
    assert_eq!(devices, 10_000.0);
    assert!(evicted >= 20_000.0, "{evicted}");
    assert!(process.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_devices_evicted_on_probation_are_written_first() {
    let redis = RedisServer::start();
    let url = redis.url();
    let process = ServerProcess::spawn(
        &[],
        &[
            ("MAX_DEVICES", "1000"),
            ("REDIS_URL", &url),
            ("SNAPSHOT_INTERVAL", "200ms"),
        ],
    );
    let mut client = connect(&process.grpc_url()).await;
    let flood = verdicts_of(&mut client, junk(0, 1500)).await;
    // Full at 1,000: junk beyond it evicts only junk already written to Redis (none
    // until the first flush).
    let refused = flood.iter().filter(|v| !v.error.is_empty()).count();
    assert!(
        flood
            .iter()
            .all(|v| v.error.is_empty() || v.error.starts_with("device_limit")),
        "{:?}",
        flood.iter().find(|v| !v.error.is_empty())
    );
    assert!(refused <= 500, "{refused}");
    // Once written, devices on probation make room for new ones.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let verdict = &verdicts_of(&mut client, one_sample("legit-new", 1.0)).await[0];
    assert!(verdict.error.is_empty(), "{}", verdict.error);
    // The evicted device's value is in its snapshot: nothing was lost.
    let mut evicted = None;
    for i in 0..1000 {
        let stats = client
            .analyze(AnalyzeRequest {
                device_id: format!("junk-{i:05}"),
            })
            .await
            .expect("analyze")
            .into_inner();
        if stats.source == Source::Snapshot as i32 {
            evicted = Some(stats);
            break;
        }
    }
    let stats = evicted.expect("a junk device left memory for legit-new");
    assert_eq!(stats.metrics[0].window_count, 1);
    assert_eq!(stats.metrics[0].last_value, 1.0);
    assert!(process.terminate().success());
}
