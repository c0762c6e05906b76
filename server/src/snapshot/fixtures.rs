//! Devices whose version-1 snapshot values are committed in `testdata/`: each is
//! rebuilt here from public engine calls, so a test can check that the committed bytes
//! still restore to exactly the state the engine reaches today. The robust detector
//! has changed how it judges since then: its device restores to what its value holds,
//! which agrees with today's engine on everything but the detector's own judgement.

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{DetectorConfig, Sample};

use crate::engine::{DeviceState, Engine, EngineConfig, MetricState};

/// Samples of one device: two metrics, a spike, and `seq` numbers.
fn samples(device: &str, count: u32) -> Vec<Sample> {
    (0..count)
        .map(|i| Sample {
            device_id: device.into(),
            time: Some(Timestamp {
                seconds: 1_700_000_000 + i64::from(i) * 60,
                nanos: 250_000_000,
            }),
            metrics: [
                (
                    "rps".to_string(),
                    100.0 + f64::from(i % 17) + if i == 200 { 80.0 } else { 0.0 },
                ),
                ("cpu".to_string(), 0.25 * f64::from(i % 5) - 0.5),
            ]
            .into_iter()
            .collect(),
            seq: u64::from(i) + 1,
        })
        .collect()
}

/// A device judged by `detector` (default: `zscore`) over `count` samples.
fn judged(device: &str, detector: Option<&str>, count: u32) -> DeviceState {
    let engine = Engine::new(EngineConfig::default());
    let spec = engine
        .detector(
            detector
                .map(|name| DetectorConfig {
                    name: name.into(),
                    ..DetectorConfig::default()
                })
                .as_ref(),
        )
        .unwrap();
    let mut out = Vec::new();
    engine.ingest_batch(&samples(device, count), &spec, &mut out);
    let mut state = engine.device_state(device).unwrap();
    state.dirty = false;
    state
}

/// A device built by hand: a wrapped window holding a negative zero, an infinite
/// z-score, a metric with no values.
fn by_hand() -> DeviceState {
    let mut d = DeviceState::new("sensor-1");
    d.last_seq = 42;
    d.updated_at = Timestamp {
        seconds: 1_710_000_000,
        nanos: 123,
    };
    let mut m = MetricState::new("rps");
    for i in 1..=73 {
        m.window
            .push(if i == 70 { -0.0 } else { f64::from(i) * 1.5 }, 50);
    }
    m.last_value = -0.0;
    m.last_z = f64::NEG_INFINITY;
    m.last_anomaly = true;
    m.anomalies_total = 3;
    d.metrics.push(m);
    d.metrics.push(MetricState::new("cpu"));
    d
}

/// The fixture devices by file stem (`testdata/v1-{stem}.bin`).
pub(crate) fn devices() -> Vec<(&'static str, DeviceState)> {
    vec![
        ("by-hand", by_hand()),
        ("zscore", judged("meter-7", None, 130)),
        ("robust", judged("meter-9", Some("robust"), 260)),
        ("empty", DeviceState::new("idle")),
    ]
}
