//! Tests of the engine as a whole: judging, limits, eviction, snapshots of devices in
//! memory.

use std::time::{Duration, Instant};

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{DetectorConfig, Sample, Verdict};

use super::locks::HOLD_SAMPLES;
use super::*;

/// A prost sample (also used by the wire codec's tests).
pub(crate) fn sample(device: &str, seq: u64, metrics: &[(&str, f64)]) -> Sample {
    Sample {
        device_id: device.into(),
        time: None,
        metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
        seq,
    }
}

fn ingest(engine: &Engine, s: Sample) -> Verdict {
    let mut out = Vec::new();
    engine.ingest_batch(&[s], &engine.default_detector(), &mut out);
    out.pop().unwrap()
}

#[test]
fn device_ids_pages_in_order_by_prefix() {
    let engine = Engine::new(EngineConfig {
        shards: 4,
        ..EngineConfig::default()
    });
    for id in ["pump-3", "pump-1", "fan-1", "pump-2", "pump-10", "fan-2"] {
        ingest(&engine, sample(id, 0, &[("rps", 1.0)]));
    }
    assert_eq!(
        engine.device_ids("pump-", "", 2),
        (vec!["pump-1".to_owned(), "pump-10".to_owned()], true)
    );
    assert_eq!(
        engine.device_ids("pump-", "pump-10", 2),
        (vec!["pump-2".to_owned(), "pump-3".to_owned()], false)
    );
    assert_eq!(engine.device_ids("pump-", "pump-3", 2), (vec![], false));
    let (all, more) = engine.device_ids("", "", 100);
    assert_eq!(all.len(), 6);
    assert!(!more);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    // Every page size walks the same sequence.
    for limit in 1..=7 {
        let (mut after, mut walked) = (String::new(), Vec::new());
        loop {
            let (page, more) = engine.device_ids("", &after, limit);
            walked.extend(page.iter().cloned());
            match page.last() {
                Some(last) if more => after = last.clone(),
                _ => break,
            }
        }
        assert_eq!(walked, all, "limit {limit}");
    }
}

#[test]
fn one_clock_read_gives_wall_receive_time_and_tick() {
    let engine = Engine::new(EngineConfig::default());
    let before = now_timestamp();
    let now = Instant::now();
    let (received, tick) = engine.clock.read(now);
    let after = now_timestamp();
    let nanos = |t: &Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    // Anchored in this very call: between two wall-clock readings around it.
    assert!(nanos(&before) <= nanos(&received) && nanos(&received) <= nanos(&after));
    assert_eq!(tick, engine.clock.tick());
    // Later reads in the same second follow the monotonic clock from that anchor.
    let later = now + Duration::from_millis(300);
    let (again, later_tick) = engine.clock.read(later);
    if later_tick == tick {
        assert_eq!(nanos(&again) - nanos(&received), 300_000_000);
    }
    assert!((0..1_000_000_000).contains(&again.nanos));
}

#[test]
fn held_shards_judge_a_batch_as_a_lock_per_sample_does() {
    // A batch longer than one hold of the shards' locks, with new and known
    // devices, duplicates, refused samples and a device limit reached midway; in
    // messages longer than the shard count (held) and shorter (a lock per sample).
    let config = |shards, hold_shards| EngineConfig {
        shards,
        hold_shards,
        max_devices: 40,
        ..EngineConfig::default()
    };
    let batch: Vec<Sample> = (0..3 * HOLD_SAMPLES as u64 + 7)
        .map(|i| match i % 11 {
            3 => sample(&format!("dev-{}", i % 50), 1, &[("cpu", 1.0)]),
            7 => sample("dev-1", i, &[("bad name", 1.0)]),
            9 => sample(&format!("dev-{}", i % 50), i, &[]),
            _ => sample(&format!("dev-{}", i % 50), i, &[("cpu", (i % 13) as f64)]),
        })
        .collect();
    // Four shards held, four with a lock per sample, eight held. Probation eviction
    // is per shard, so engines of other shard counts may evict other devices; the
    // eight-shard one is compared on its counts only.
    let engines = [
        Engine::new(config(8, true)),
        Engine::new(config(4, true)),
        Engine::new(config(4, false)),
    ];
    let mut verdicts = [Vec::new(), Vec::new(), Vec::new()];
    let mut rest = &batch[..];
    for n in [HOLD_SAMPLES + 3, 3].into_iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        let at = Instant::now();
        let outcomes: Vec<_> = engines
            .iter()
            .zip(&mut verdicts)
            .map(|(e, out)| e.ingest_batch_at(chunk, &e.default_detector(), out, at))
            .collect();
        assert_eq!(
            outcomes[0].applied + outcomes[0].rejected + outcomes[0].duplicates,
            chunk.len() as u64
        );
        assert_eq!(outcomes[1], outcomes[2]);
    }
    let [eight, held, each] = &verdicts;
    assert_eq!(each.len(), batch.len());
    assert_eq!(eight.len(), batch.len());
    assert_eq!(held, each);
    // Past the limit, devices on probation leave the tables mid-message (held: with
    // positions found ahead of them).
    assert!(
        engines[1].probation_evictions() > 0 && each.iter().any(|v| v.duplicate),
        "the batch exercises both"
    );
    assert_eq!(
        engines[1].probation_evictions(),
        engines[2].probation_evictions()
    );
    for engine in &engines {
        assert_eq!(engine.device_count(), 40);
    }
    // Once every device in memory came back, a new one is refused.
    for engine in &engines[1..] {
        let mut out = Vec::new();
        for _ in 0..2 {
            let known: Vec<Sample> = (0..50)
                .map(|i| format!("dev-{i}"))
                .filter(|id| engine.contains(id))
                .map(|id| sample(&id, 0, &[("cpu", 1.0)]))
                .collect();
            engine.ingest_batch(&known, &engine.default_detector(), &mut out);
        }
        let v = ingest(engine, sample("dev-new", 0, &[("cpu", 1.0)]));
        assert!(v.error.starts_with("device_limit"), "{}", v.error);
    }
}

#[test]
fn seed_check() {
    let engine = Engine::new(EngineConfig::default());
    for v in [420.0, 430.0, 410.0, 440.0, 425.0] {
        let verdict = ingest(&engine, sample("", 0, &[("rps", v)]));
        assert!(!verdict.anomaly);
        assert_eq!(verdict.device_id, "default");
    }
    let v = ingest(&engine, sample("", 0, &[("rps", 900.0)]));
    assert!(v.anomaly);
    let m = &v.metrics[0];
    assert_eq!((m.mean, m.window_count), (425.0, 5));
    assert!((m.stddev - 10.0).abs() < 1e-12);
    assert!((m.z_score - 47.5).abs() < 1e-9);
}

#[test]
fn warm_up_and_flat_window() {
    let engine = Engine::new(EngineConfig::default());
    for i in 0..5 {
        let v = ingest(&engine, sample("d", 0, &[("x", 1.0)]));
        assert_eq!(v.metrics[0].window_count, i);
        assert!(!v.anomaly);
    }
    let same = ingest(&engine, sample("d", 0, &[("x", 1.0)]));
    assert_eq!((same.metrics[0].z_score, same.anomaly), (0.0, false));
    let below = ingest(&engine, sample("d", 0, &[("x", 0.5)]));
    assert_eq!(below.metrics[0].z_score, f64::NEG_INFINITY);
    assert!(below.anomaly);
}

#[test]
fn threshold_is_strict() {
    let engine = Engine::new(EngineConfig {
        min_samples: 2,
        ..EngineConfig::default()
    });
    ingest(&engine, sample("d", 0, &[("x", 1.0)]));
    ingest(&engine, sample("d", 0, &[("x", 3.0)]));
    // mean 2, stddev 1: 4 has z exactly 2, not above the threshold.
    let v = ingest(&engine, sample("d", 0, &[("x", 4.0)]));
    assert_eq!(v.metrics[0].z_score, 2.0);
    assert!(!v.anomaly);
}

#[test]
fn duplicates_leave_the_window_alone() {
    let engine = Engine::new(EngineConfig::default());
    ingest(&engine, sample("d", 5, &[("x", 1.0)]));
    for seq in [5, 3] {
        let v = ingest(&engine, sample("d", seq, &[("x", 100.0)]));
        assert!(v.duplicate);
        assert!(v.metrics.is_empty());
    }
    let stats = engine.analyze("d").unwrap();
    assert_eq!(stats.metrics[0].window_count, 1);
    assert_eq!(stats.last_seq, 5);
    // seq 0 is "none": never a duplicate.
    assert!(!ingest(&engine, sample("d", 0, &[("x", 1.0)])).duplicate);
    assert!(!ingest(&engine, sample("d", 6, &[("x", 1.0)])).duplicate);
}

#[test]
fn invalid_samples_are_rejected_without_side_effects() {
    let engine = Engine::new(EngineConfig::default());
    let cases: Vec<(Sample, &str)> = vec![
        (
            sample("d", 1, &[("cpu", f64::NAN)]),
            "invalid_value: metric \"cpu\" is NaN",
        ),
        (sample("d", 1, &[("cpu", f64::INFINITY)]), "invalid_value"),
        (sample("d", 1, &[]), "no_metrics"),
        (
            sample(&"x".repeat(200), 1, &[("cpu", 1.0)]),
            "invalid_device_id",
        ),
        (sample("d", 1, &[("cpu load", 1.0)]), "invalid_metric_name"),
        (sample("d", 1, &[("", 1.0)]), "invalid_metric_name"),
    ];
    for (s, want) in cases {
        let v = ingest(&engine, s);
        assert!(
            v.error.starts_with(want),
            "{} does not start with {want}",
            v.error
        );
        assert!(v.metrics.is_empty());
    }
    let many: Vec<(String, f64)> = (0..33).map(|i| (format!("m{i}"), 1.0)).collect();
    let s = Sample {
        device_id: "d".into(),
        metrics: many.into_iter().collect(),
        ..Sample::default()
    };
    assert!(ingest(&engine, s).error.starts_with("too_many_metrics"));
    // Nothing was created by any of the rejected samples, and seq 1 is still new.
    assert_eq!(engine.device_count(), 0);
    assert!(!ingest(&engine, sample("d", 1, &[("cpu", 1.0)])).duplicate);
}

#[test]
fn metric_limit_counts_across_samples() {
    let engine = Engine::new(EngineConfig {
        max_metrics_per_device: 2,
        ..EngineConfig::default()
    });
    ingest(&engine, sample("d", 0, &[("a", 1.0), ("b", 1.0)]));
    assert!(
        ingest(&engine, sample("d", 0, &[("a", 1.0)]))
            .error
            .is_empty()
    );
    let v = ingest(&engine, sample("d", 0, &[("a", 2.0), ("c", 1.0)]));
    assert!(v.error.starts_with("too_many_metrics"), "{}", v.error);
    assert_eq!(engine.analyze("d").unwrap().metrics[0].window_count, 2);
}

#[test]
fn device_limit_refuses_new_devices_only() {
    let engine = Engine::new(EngineConfig {
        max_devices: 2,
        ..EngineConfig::default()
    });
    // Two samples each: neither is on probation any more.
    for _ in 0..2 {
        ingest(&engine, sample("a", 0, &[("x", 1.0)]));
        ingest(&engine, sample("b", 0, &[("x", 1.0)]));
    }
    assert!(
        ingest(&engine, sample("c", 0, &[("x", 1.0)]))
            .error
            .starts_with("device_limit")
    );
    assert!(
        ingest(&engine, sample("a", 0, &[("x", 1.0)]))
            .error
            .is_empty()
    );
    assert_eq!(engine.device_count(), 2);
}

#[test]
fn idle_devices_are_evicted() {
    let engine = Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(10),
        ..EngineConfig::default()
    });
    ingest(&engine, sample("a", 0, &[("x", 1.0)]));
    assert!(engine.evict_idle(Instant::now()).is_empty());
    let evicted = engine.evict_idle(Instant::now() + Duration::from_secs(11));
    assert_eq!(evicted.len(), 1);
    assert_eq!(&*evicted[0].id, "a");
    assert_eq!(engine.device_count(), 0);
    assert!(engine.analyze("a").is_none());
}

/// Ingests a mix: three devices, windows of 3 (shrinking later), 50 and 100
/// values, a robust stream, a device with a long id, duplicates and errors.
fn busy_engine() -> Engine {
    let engine = Engine::new(EngineConfig::default());
    let small = engine
        .detector(Some(&DetectorConfig {
            window_size: 3,
            min_samples: 2,
            ..DetectorConfig::default()
        }))
        .unwrap();
    let large = engine
        .detector(Some(&DetectorConfig {
            window_size: 100,
            ..DetectorConfig::default()
        }))
        .unwrap();
    let robust = engine
        .detector(Some(&DetectorConfig {
            name: "robust".into(),
            ..DetectorConfig::default()
        }))
        .unwrap();
    let default = engine.default_detector();
    let long_id = "a-device-id-longer-than-twenty-two-bytes";
    let mut out = Vec::new();
    for i in 0..130u32 {
        let v = f64::from(i % 7) * 1.5 + f64::from(i);
        let spec = [&small, &large, &robust, &default][i as usize % 4];
        let samples = [
            sample("a", u64::from(i) + 1, &[("cpu", v), ("mem", -v)]),
            sample("a", 1, &[("cpu", 1.0)]),
            sample(long_id, 0, &[("x", v * 1e6)]),
            sample("b", 0, &[("cpu", v), ("disk", f64::from(i % 3))]),
            sample("b", 0, &[("bad name", 1.0)]),
        ];
        engine.ingest_batch(&samples, spec, &mut out);
    }
    engine
}

#[test]
fn devices_in_memory_encode_as_their_snapshot_state() {
    let engine = busy_engine();
    let mut encoded = Vec::new();
    for shard in 0..engine.shard_count() {
        let mut keys = Vec::new();
        engine.dirty_keys(shard, &mut keys);
        engine.visit_dirty(shard, &keys, |mut device| {
            let mut bytes = Vec::new();
            device.encode(&mut bytes);
            encoded.push((device.id().to_owned(), bytes));
            device.mark_clean();
        });
    }
    assert_eq!(encoded.len(), 3);
    for (id, from_memory) in encoded {
        let state = engine.device_state(&id).unwrap();
        assert!(!state.dirty, "visited and marked clean");
        let mut from_state = Vec::new();
        state.encode(&mut from_state);
        assert_eq!(from_memory, from_state, "{id}");
        // What the flusher writes from memory is the generated encoding of the
        // schema's message, and prost reads back that very message.
        let message = state.to_snapshot();
        assert_eq!(from_memory, prost::Message::encode_to_vec(&message), "{id}");
        let decoded: tidewatch_proto::v1::DeviceSnapshot =
            prost::Message::decode(from_memory.as_slice()).unwrap();
        assert_eq!(decoded, message, "{id}");
        assert_eq!(DeviceState::from_snapshot(decoded).unwrap(), state, "{id}");
    }
    // Clean devices are not visited again.
    let mut keys = Vec::new();
    for shard in 0..engine.shard_count() {
        engine.dirty_keys(shard, &mut keys);
    }
    assert!(keys.is_empty());
}

#[test]
fn restored_devices_continue_exactly() {
    let engine = busy_engine();
    let other = Engine::new(EngineConfig::default());
    for id in ["a", "b", "a-device-id-longer-than-twenty-two-bytes"] {
        let state = engine.device_state(id).unwrap();
        let last_value = state.metrics[0].last_value;
        assert_eq!(last_value, state.metrics[0].window.iter().last().unwrap());
        assert!(other.insert_if_absent(state.clone()));
        assert_eq!(other.device_state(id).unwrap(), state);
        assert_eq!(other.analyze(id), engine.analyze(id));
    }
    let next = [
        sample("a", 500, &[("cpu", 3.0), ("mem", 4.0), ("new", 1.0)]),
        sample("b", 0, &[("cpu", 1e3), ("disk", 2.0)]),
        sample("a-device-id-longer-than-twenty-two-bytes", 0, &[("x", 5.0)]),
    ];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    engine.ingest_batch(&next, &engine.default_detector(), &mut a);
    other.ingest_batch(&next, &other.default_detector(), &mut b);
    assert_eq!(a, b);
}

#[test]
fn evicted_devices_give_back_their_values_and_names() {
    let engine = Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(10),
        shards: 1,
        ..EngineConfig::default()
    });
    let ingest_all = |prefix: &str| {
        let samples: Vec<_> = (0..100)
            .map(|i| {
                sample(
                    &format!("{prefix}{i}"),
                    0,
                    &[("cpu", 1.0), (&format!("m{i}"), 2.0)],
                )
            })
            .collect();
        let mut out = Vec::new();
        engine.ingest_batch(&samples, &engine.default_detector(), &mut out);
    };
    ingest_all("first-");
    let (runs, names) = {
        let table = engine.shards[0].lock();
        (table.pool.bump(), table.names.len())
    };
    assert_eq!(names, 101);
    let evicted = engine.evict_idle(Instant::now() + Duration::from_secs(11));
    assert_eq!(evicted.len(), 100);
    assert_eq!(engine.shards[0].lock().names.len(), 0);
    // A second fleet of the same shape reuses the freed runs.
    ingest_all("second-");
    let table = engine.shards[0].lock();
    assert_eq!(table.pool.bump(), runs);
    assert_eq!(table.names.len(), 101);
    assert_eq!(table.len(), 100);
}

#[test]
fn metrics_in_verdict_are_sorted_by_name() {
    let engine = Engine::new(EngineConfig::default());
    let v = ingest(
        &engine,
        sample("d", 0, &[("rps", 1.0), ("cpu", 2.0), ("mem", 3.0)]),
    );
    let names: Vec<_> = v.metrics.iter().map(|m| m.metric.as_str()).collect();
    assert_eq!(names, ["cpu", "mem", "rps"]);
}

/// A detector spec asking for `window_size` (and `name`).
fn spec(engine: &Engine, name: &str, window_size: u32) -> DetectorSpec {
    engine
        .detector(Some(&DetectorConfig {
            name: name.into(),
            window_size,
            ..DetectorConfig::default()
        }))
        .unwrap()
}

/// `count` metrics named m0, m1, ... with value `v`.
fn metrics(count: usize, v: f64) -> Vec<(String, f64)> {
    (0..count).map(|i| (format!("m{i}"), v)).collect()
}

fn sample_of(device: &str, metrics: &[(String, f64)]) -> Sample {
    let named: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    sample(device, 0, &named)
}

fn ingest_with(engine: &Engine, s: Sample, spec: &DetectorSpec) -> Verdict {
    let mut out = Vec::new();
    engine.ingest_batch(&[s], spec, &mut out);
    out.pop().unwrap()
}

#[test]
fn the_budget_counts_what_devices_hold_and_gets_it_all_back() {
    use super::budget::{DEVICE_BYTES, capacity_after, device_bytes, metric_bytes, records_bytes};
    use super::names::name_bytes;
    use super::pool::heap;
    let engine = Engine::new(EngineConfig {
        shards: 1,
        idle_timeout: Duration::from_secs(10),
        ..EngineConfig::default()
    });
    let (zscore, wide, robust) = (
        engine.default_detector(),
        spec(&engine, "zscore", 4096),
        spec(&engine, "robust", 0),
    );
    // 2 metrics × 50 values: the README's device.
    ingest_with(
        &engine,
        sample("small", 0, &[("cpu", 1.0), ("mem", 2.0)]),
        &zscore,
    );
    let names = name_bytes(3) * 2;
    let small = DEVICE_BYTES + 2 * 8 * 50;
    assert_eq!(engine.memory_used(), small + names);
    // 32 metrics × 4,096 values, a 39-byte id on the heap.
    let long = "a-device-id-of-39-bytes-000000000000001";
    ingest_with(&engine, sample_of(long, &metrics(32, 1.0)), &wide);
    let names32: usize = (0..32).map(|i| name_bytes(format!("m{i}").len())).sum();
    let big = device_bytes(long.len()) + records_bytes(32) + 32 * metric_bytes(4096, 0);
    assert_eq!(device_bytes(long.len()), DEVICE_BYTES + heap(long.len()));
    assert_eq!(engine.memory_used(), small + names + big + names32);
    // The robust detector's state, for the default baseline of 128 values.
    ingest_with(
        &engine,
        sample("robust", 0, &[("cpu", 1.0), ("mem", 2.0)]),
        &robust,
    );
    let with_robust = DEVICE_BYTES + 2 * metric_bytes(50, 128);
    assert_eq!(
        engine.memory_used(),
        small + names + big + names32 + with_robust
    );
    // A third metric moves the records to the heap; a wider stream regrows the rest.
    ingest_with(&engine, sample("small", 0, &[("disk", 1.0)]), &zscore);
    let grown = small + records_bytes(capacity_after(2, 2, 1)) + 8 * 50 + name_bytes(4);
    assert_eq!(
        engine.memory_used(),
        grown + names + big + names32 + with_robust
    );
    ingest_with(&engine, sample("small", 0, &[("disk", 1.0)]), &wide);
    let wider = grown + 3 * 8 * (4096 - 50);
    assert_eq!(
        engine.memory_used(),
        wider + names + big + names32 + with_robust
    );
    // Everything comes back when the devices leave, names included.
    assert!(engine.remove("robust").is_some());
    assert_eq!(
        engine
            .evict_idle(Instant::now() + Duration::from_secs(11))
            .len(),
        2
    );
    assert_eq!(engine.memory_used(), 0);
    assert_eq!(engine.device_count(), 0);
}

#[test]
fn past_the_budget_a_sample_is_refused_and_nothing_else_changes() {
    use super::budget::{DEVICE_BYTES, metric_bytes};
    use super::names::name_bytes;
    let engine = Engine::new(EngineConfig {
        memory_budget: 8192,
        ..EngineConfig::default()
    });
    let (zscore, wide) = (engine.default_detector(), spec(&engine, "zscore", 4096));
    // 32 × 4,096 values (1 MiB): refused, and no device is created.
    let v = ingest_with(&engine, sample_of("huge", &metrics(32, 1.0)), &wide);
    assert!(
        v.error.starts_with("memory_budget: device \"huge\" needs "),
        "{}",
        v.error
    );
    assert!(
        v.error.contains("MEMORY_BUDGET (8192 bytes)"),
        "{}",
        v.error
    );
    assert!(engine.analyze("huge").is_none());
    assert_eq!((engine.device_count(), engine.memory_used()), (0, 0));
    // Small devices fit; the same device asking for a wide window does not.
    for _ in 0..2 {
        assert!(
            ingest_with(&engine, sample("a", 0, &[("cpu", 1.0)]), &zscore)
                .error
                .is_empty()
        );
    }
    let used = engine.memory_used();
    assert_eq!(used, DEVICE_BYTES + metric_bytes(50, 0) + name_bytes(3));
    let v = ingest_with(&engine, sample("a", 0, &[("cpu", 2.0)]), &wide);
    assert!(v.error.starts_with("memory_budget"), "{}", v.error);
    let v = ingest_with(&engine, sample_of("a", &metrics(31, 1.0)), &zscore);
    assert!(v.error.starts_with("memory_budget"), "{}", v.error);
    assert_eq!(engine.memory_used(), used, "refusals take nothing");
    let stats = engine.analyze("a").unwrap();
    assert_eq!((stats.metrics.len(), stats.metrics[0].window_count), (1, 2));
    // The device's own samples go on.
    assert!(
        ingest_with(&engine, sample("a", 0, &[("cpu", 3.0)]), &zscore)
            .error
            .is_empty()
    );
    // A device on probation is not evicted for one that would not fit anyway.
    let mut out = Vec::new();
    let outcome = engine.ingest_batch(
        &[
            sample("b", 0, &[("cpu", 1.0)]),
            sample_of("c", &metrics(32, 1.0)),
        ],
        &zscore,
        &mut out,
    );
    assert_eq!(outcome.rejected_by_reason[9], 1, "{out:?}");
    assert!(engine.contains("b") && !engine.contains("c"));
    assert_eq!(engine.probation_evictions(), 0);
    assert_eq!(crate::error::SampleError::REASONS[9], "memory_budget");
}

#[test]
fn a_fleet_that_came_back_keeps_no_probation_queue() {
    // Messages of 100 samples, as streams send them (the path that holds its shards),
    // and single samples: after every device's second sample, no shard holds an
    // entry (one of 8 bytes per device ever seen otherwise, until a trim).
    let engine = Engine::new(EngineConfig::default());
    let zscore = engine.default_detector();
    let ids: Vec<String> = (0..3000).map(|i| format!("fleet/dev-{i:06}")).collect();
    for round in 0..2 {
        for chunk in ids[..2000].chunks(100) {
            let samples: Vec<_> = chunk
                .iter()
                .map(|id| sample(id, 0, &[("x", f64::from(round))]))
                .collect();
            let mut out = Vec::new();
            let outcome = engine.ingest_batch(&samples, &zscore, &mut out);
            assert_eq!(outcome.applied, 100, "{out:?}");
        }
        for id in &ids[2000..] {
            assert!(
                ingest(&engine, sample(id, 0, &[("x", 1.0)]))
                    .error
                    .is_empty()
            );
        }
        let queued: usize = engine
            .shards
            .iter()
            .map(|s| s.lock().probation_entries())
            .sum();
        assert_eq!(queued, if round == 0 { 3000 } else { 0 });
    }
}

#[test]
fn devices_on_probation_are_evicted_first_when_the_table_is_full() {
    let engine = Engine::new(EngineConfig {
        shards: 1,
        max_devices: 4,
        ..EngineConfig::default()
    });
    // Two devices that came back, then junk ids seen once each.
    for _ in 0..2 {
        ingest(&engine, sample("legit-1", 0, &[("x", 1.0)]));
        ingest(&engine, sample("legit-2", 0, &[("x", 1.0)]));
    }
    for i in 0..100 {
        let v = ingest(&engine, sample(&format!("junk-{i}"), 0, &[("x", 1.0)]));
        assert!(v.error.is_empty(), "junk-{i}: {}", v.error);
    }
    assert_eq!(engine.device_count(), 4);
    assert_eq!(engine.probation_evictions(), 98);
    assert!(engine.contains("junk-99") && engine.contains("junk-98"));
    // The devices that came back kept their windows; a new one gets in, and stays
    // once it comes back.
    assert_eq!(
        engine.analyze("legit-1").unwrap().metrics[0].window_count,
        2
    );
    assert!(
        ingest(&engine, sample("new", 0, &[("x", 1.0)]))
            .error
            .is_empty()
    );
    assert!(!engine.contains("junk-98"), "the oldest on probation left");
    assert!(
        ingest(&engine, sample("new", 0, &[("x", 2.0)]))
            .error
            .is_empty()
    );
    assert!(
        ingest(&engine, sample("junk-x", 0, &[("x", 1.0)]))
            .error
            .is_empty()
    );
    assert!(engine.contains("new") && !engine.contains("junk-99"));
    // With no device on probation left, new devices are refused.
    ingest(&engine, sample("junk-x", 0, &[("x", 1.0)]));
    let v = ingest(&engine, sample("late", 0, &[("x", 1.0)]));
    assert!(v.error.starts_with("device_limit"), "{}", v.error);
    for id in ["legit-1", "legit-2", "new", "junk-x"] {
        assert!(engine.contains(id), "{id}");
    }
}

#[test]
fn with_snapshots_only_written_devices_on_probation_make_room() {
    let engine = Engine::new(EngineConfig {
        shards: 1,
        max_devices: 2,
        snapshots: true,
        ..EngineConfig::default()
    });
    let restored = |id: &str| DeviceState::new(id);
    // As a restore admits them: inserted, then judged once.
    for id in ["a", "b"] {
        assert!(engine.insert_if_absent(restored(id)));
        assert!(
            ingest(&engine, sample(id, 0, &[("x", 1.0)]))
                .error
                .is_empty()
        );
    }
    // Both are dirty (not in Redis yet): nothing can make room.
    assert!(!engine.insert_if_absent(restored("c")));
    // Judging stops at an unknown device so that a restore admits it.
    let mut out = Vec::new();
    let (_, judged) = engine.ingest_batch_with(
        &[sample("c", 0, &[("x", 1.0)])],
        &engine.default_detector(),
        &mut out,
        Instant::now(),
        true,
    );
    assert_eq!(judged, 0);
    // Once written, the oldest is evicted, and its id is handed to the snapshots.
    let mut keys = Vec::new();
    engine.dirty_keys(0, &mut keys);
    engine.visit_dirty(0, &keys, |mut d| d.mark_clean());
    assert!(engine.insert_if_absent(restored("c")));
    assert!(!engine.contains("a") && engine.contains("b") && engine.contains("c"));
    assert_eq!(engine.take_evicted(), vec![Box::<str>::from("a")]);
    assert!(engine.take_evicted().is_empty());
    // A device restored with history is not on probation.
    let mut history = DeviceState::new("d");
    history.last_seq = 7;
    assert!(engine.insert_if_absent(history));
    assert!(!engine.contains("b"));
}

#[test]
fn the_value_pool_compacts_when_devices_leave() {
    let engine = Engine::new(EngineConfig {
        shards: 1,
        ..EngineConfig::default()
    });
    let (w200, w150) = (spec(&engine, "zscore", 200), spec(&engine, "zscore", 150));
    let fleet = |prefix: &str, spec: &DetectorSpec, n: usize| {
        let samples: Vec<Sample> = (0..n)
            .flat_map(|i| {
                (0..10).map(move |k| {
                    sample(
                        &format!("{prefix}{i}"),
                        0,
                        &[("cpu", (i * 7 + k) as f64), ("mem", k as f64)],
                    )
                })
            })
            .collect();
        let mut out = Vec::new();
        engine.ingest_batch(&samples, spec, &mut out);
        assert!(out.iter().all(|v| v.error.is_empty()));
    };
    // 3,000 devices × 2 full windows of 200 values: more than two chunks of the pool.
    fleet("a-", &w200, 3000);
    let grown = engine.shards[0].lock().pool.bump();
    assert!(grown > 1_000_000, "{grown}");
    let kept: Vec<DeviceState> = (0..3000)
        .step_by(3)
        .map(|i| engine.device_state(&format!("a-{i}")).unwrap())
        .collect();
    for i in 0..3000 {
        if i % 3 != 0 {
            engine.remove(&format!("a-{i}")).unwrap();
        }
    }
    // The pool compacted as devices left: the kept windows are intact.
    assert!(engine.shards[0].lock().pool.bump() < grown / 2);
    for state in &kept {
        assert_eq!(&engine.device_state(&state.id).unwrap(), state);
    }
    // A fleet of another window length fits in what the first one left.
    fleet("b-", &w150, 2000);
    assert!(engine.shards[0].lock().pool.bump() <= grown);
    for state in &kept {
        assert_eq!(&engine.device_state(&state.id).unwrap(), state);
    }
}

#[test]
fn a_stream_window_above_max_stream_window_is_refused() {
    let engine = Engine::new(EngineConfig {
        max_stream_window: 256,
        ..EngineConfig::default()
    });
    for name in ["zscore", "robust"] {
        let error = engine
            .detector(Some(&DetectorConfig {
                name: name.into(),
                window_size: 257,
                ..DetectorConfig::default()
            }))
            .unwrap_err();
        assert_eq!(error.kind, crate::error::ErrorKind::InvalidArgument);
        assert_eq!(
            error.message,
            format!(
                "detector {name}: window_size 257 is above the server's limit 256 (MAX_STREAM_WINDOW)"
            )
        );
        assert!(spec(&engine, name, 256).window_size > 0);
    }
}

/// One sample of `device` judged for `owner`; its verdict.
fn ingest_for(engine: &Engine, owner: Option<Owner<'_>>, device: &str) -> Verdict {
    let mut out = Vec::new();
    engine.ingest_batch_for(
        &[sample(device, 0, &[("x", 1.0)])],
        &engine.default_detector(),
        &mut out,
        Instant::now(),
        false,
        owner,
    );
    out.pop().unwrap()
}

#[test]
fn a_devices_quota_counts_what_enters_and_leaves_memory() {
    let engine = Engine::new(EngineConfig {
        shards: 2,
        idle_timeout: Duration::from_secs(60),
        ..EngineConfig::default()
    });
    let a = Some(Owner {
        name: "a",
        limit: 3,
    });
    for id in ["a-1", "a-2", "a-3"] {
        assert!(ingest_for(&engine, a, id).error.is_empty(), "{id}");
    }
    assert_eq!(engine.devices_held("a"), 3);
    // A fourth device is refused, and nothing of it enters memory.
    let refused = ingest_for(&engine, a, "a-4");
    assert!(
        refused.error.starts_with("device_quota:"),
        "{}",
        refused.error
    );
    assert!(!engine.contains("a-4"));
    // Devices in memory are judged as before; other callers are not counted.
    assert!(ingest_for(&engine, a, "a-1").error.is_empty());
    assert!(ingest_for(&engine, None, "free-1").error.is_empty());
    let b = Some(Owner {
        name: "b",
        limit: 1,
    });
    assert!(ingest_for(&engine, b, "b-1").error.is_empty());
    assert_eq!((engine.devices_held("a"), engine.devices_held("b")), (3, 1));
    // A removal (hand-off, loss race, delete) gives the slot back.
    assert_eq!(engine.holder_of("a-2").as_deref(), Some("a"));
    assert_eq!(engine.holder_of("free-1"), None);
    assert!(engine.remove("a-2").is_some());
    assert_eq!(engine.holder_of("a-2"), None);
    assert_eq!(engine.devices_held("a"), 2);
    assert!(ingest_for(&engine, a, "a-4").error.is_empty());
    // A restore for the owner counts, and is refused when full.
    assert!(!engine.insert_if_absent_for(DeviceState::new("a-5"), a));
    assert!(
        engine.insert_if_absent_for(DeviceState::new("b-2"), b.map(|b| Owner { limit: 2, ..b }))
    );
    assert_eq!(engine.devices_held("b"), 2);
    // Idle eviction gives every slot back.
    let evicted = engine.evict_idle(Instant::now() + Duration::from_secs(3600));
    assert_eq!(evicted.len(), 6);
    assert_eq!((engine.devices_held("a"), engine.devices_held("b")), (0, 0));
    for id in ["a-5", "a-6", "a-7"] {
        assert!(ingest_for(&engine, a, id).error.is_empty(), "{id}");
    }
}

#[test]
fn probation_eviction_gives_the_quota_back() {
    let engine = Engine::new(EngineConfig {
        shards: 1,
        max_devices: 2,
        ..EngineConfig::default()
    });
    let a = Some(Owner {
        name: "a",
        limit: 2,
    });
    assert!(ingest_for(&engine, a, "a-1").error.is_empty());
    assert!(ingest_for(&engine, a, "a-2").error.is_empty());
    // Another caller's new device evicts a-1 (on probation) to make room.
    assert!(ingest_for(&engine, None, "other").error.is_empty());
    assert!(!engine.contains("a-1"));
    assert_eq!(engine.devices_held("a"), 1);
    // A refusal for another reason (the table full of graduated devices) takes nothing.
    for seq in 1..=2 {
        for id in ["a-2", "other"] {
            assert!(
                ingest(&engine, sample(id, seq, &[("x", 1.0)]))
                    .error
                    .is_empty()
            );
        }
    }
    let refused = ingest_for(&engine, a, "a-3");
    assert!(
        refused.error.starts_with("device_limit"),
        "{}",
        refused.error
    );
    assert_eq!(engine.devices_held("a"), 1);
}
