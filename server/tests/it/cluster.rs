//! Real servers (the binary) on a real local Redis Cluster (three masters, three
//! replicas, `REDIS_CLUSTER_NODES`): snapshots are written to and restored from the
//! master of each device's slot, a master killed with `kill -9` costs no verdict and
//! flushing resumes after the failover, and devices moving between replicas keep one
//! history. Each test compares verdict by verdict with one uninterrupted server fed
//! the same samples.

use std::time::{Duration, Instant};

use crate::common::{
    ServerProcess, TestServer, connect, redis_cluster::RedisCluster, sample, verdicts_of,
};
use tidewatch_proto::v1::{
    AnalyzeRequest, DeleteDeviceRequest, IngestRequest, Sample, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::snapshot::fence;
use tonic::transport::Channel;

/// Devices of the tests: spread over the three masters, one with braces in its id
/// (keyed in hex, so its three keys still share a slot).
fn devices() -> Vec<String> {
    let mut ids: Vec<String> = (0..23).map(|i| format!("pump-{i}")).collect();
    ids.push("valve{7}".into());
    ids
}

/// Round `seq` of every device: noise, spikes and a level shift, so that verdicts
/// depend on the whole history.
fn round(devices: &[String], seq: u64) -> Vec<Sample> {
    devices
        .iter()
        .enumerate()
        .map(|(d, id)| {
            let noise = ((seq * 7919 + d as u64 * 31) % 101) as f64 * 0.37;
            let spike = if (seq + d as u64).is_multiple_of(17) {
                400.0
            } else {
                0.0
            };
            let shift = if seq > 45 { 1e4 } else { 0.0 };
            sample(id, seq, &[("rps", 420.0 + noise + spike + shift)])
        })
        .collect()
}

/// One request on its own Ingest stream; its verdicts.
async fn send(client: &mut TelemetryServiceClient<Channel>, samples: &[Sample]) -> Vec<Verdict> {
    let request = IngestRequest {
        samples: samples.to_vec(),
        ..IngestRequest::default()
    };
    let verdicts = verdicts_of(client, vec![request]).await;
    assert_eq!(verdicts.len(), samples.len());
    verdicts
}

/// Sends samples until none is answered `moved` (what the SDKs do): the moved ones
/// go again, the others' verdicts are kept. Fails after 20 s.
async fn send_retrying(
    client: &mut TelemetryServiceClient<Channel>,
    samples: &[Sample],
) -> Vec<Verdict> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut verdicts: Vec<Option<Verdict>> = vec![None; samples.len()];
    loop {
        let pending: Vec<usize> = (0..samples.len())
            .filter(|&i| verdicts[i].is_none())
            .collect();
        if pending.is_empty() {
            return verdicts.into_iter().flatten().collect();
        }
        let batch: Vec<Sample> = pending.iter().map(|&i| samples[i].clone()).collect();
        for (i, verdict) in pending.into_iter().zip(send(client, &batch).await) {
            if !verdict.error.starts_with("moved:") {
                verdicts[i] = Some(verdict);
            }
        }
        assert!(Instant::now() < deadline, "samples stay moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The verdicts of one uninterrupted server without Redis, round by round.
async fn reference(devices: &[String], rounds: u64) -> Vec<Vec<Verdict>> {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut all = Vec::new();
    for seq in 1..=rounds {
        all.push(send(&mut client, &round(devices, seq)).await);
    }
    server.stop().await.expect("stop");
    all
}

fn replica(cluster: &RedisCluster) -> ServerProcess {
    ServerProcess::spawn(
        &[],
        &[
            ("REDIS_CLUSTER_NODES", &cluster.seeds()),
            ("SNAPSHOT_INTERVAL", "100ms"),
        ],
    )
}

fn assert_same(got: &[Vec<Verdict>], want: &[Vec<Verdict>]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        for (g, w) in g.iter().zip(w) {
            assert!(g.error.is_empty(), "{}", g.error);
            assert_eq!(g, w, "device {} seq {}", w.device_id, w.seq);
        }
    }
    assert!(
        want.iter().flatten().any(|v| v.anomaly),
        "the data has anomalies"
    );
}

/// Polls the cluster until every device's snapshot holds `seq`.
async fn wait_for_flush(cluster: &RedisCluster, devices: &[String], seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in devices {
        while cluster.snapshot(id).await.is_none_or(|d| d.last_seq < seq) {
            assert!(Instant::now() < deadline, "{id}: no flush with seq {seq}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A master is killed with `kill -9` while a replica ingests: no verdict fails (the
/// windows are in memory), flushing resumes once a replica took the master's slots
/// over, and a second server that takes every device over afterwards continues
/// each history exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_costs_no_verdict_and_no_history() {
    let mut cluster = RedisCluster::start();
    let ids = devices();
    let want = reference(&ids, 60).await;
    let a = replica(&cluster);
    let mut ca = connect(&a.grpc_url()).await;
    let mut got = Vec::new();
    for seq in 1..=20 {
        got.push(send(&mut ca, &round(&ids, seq)).await);
    }
    wait_for_flush(&cluster, &ids, 20).await;

    let killed = cluster.kill_master_of(&ids[0]).await;
    let started = Instant::now();
    // During the failover: every verdict from memory, none failed.
    for seq in 21..=40 {
        got.push(send(&mut ca, &round(&ids, seq)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = cluster.wait_for_failover(&ids[0], killed).await;
    // Flushing resumes: every device's snapshot, the failed master's included,
    // reaches seq 40.
    wait_for_flush(&cluster, &ids, 40).await;
    eprintln!(
        "failover in {took:?}; flushes resumed {:?} after the kill",
        started.elapsed()
    );

    // A second replica takes every device over (A drains and retires) and goes on
    // from the snapshots the cluster holds.
    let b = replica(&cluster);
    let status = a.terminate();
    assert!(status.success(), "{status:?}");
    let mut cb = connect(&b.grpc_url()).await;
    for seq in 41..=60 {
        got.push(send_retrying(&mut cb, &round(&ids, seq)).await);
    }
    assert_same(&got, &want);
}

/// Three servers on the cluster: A→B→A with no pause (hand-off over pub/sub between
/// replicas connected to different masters), then A killed with `kill -9`, and C
/// takes over after A's lease runs out from what A last flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_cluster_keep_one_history() {
    let cluster = RedisCluster::start();
    let ids = devices();
    let want = reference(&ids, 60).await;
    let (a, b) = (replica(&cluster), replica(&cluster));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    let mut got = Vec::new();
    for seq in 1..=30 {
        let client = if (seq - 1) / 10 % 2 == 0 {
            &mut ca
        } else {
            &mut cb
        };
        got.push(send_retrying(client, &round(&ids, seq)).await);
    }
    // Outside the crash window: everything A answered is flushed, then A dies
    // holding every device.
    wait_for_flush(&cluster, &ids, 30).await;
    a.kill9();
    let c = replica(&cluster);
    let mut cc = connect(&c.grpc_url()).await;
    for seq in 31..=60 {
        got.push(send_retrying(&mut cc, &round(&ids, seq)).await);
    }
    assert_same(&got, &want);
    // Analyze on a replica that does not hold the devices answers from the master
    // of each one's slot.
    wait_for_flush(&cluster, &ids, 60).await;
    for id in [&ids[0], &ids[ids.len() - 1]] {
        let stats = cb
            .analyze(AnalyzeRequest {
                device_id: id.clone(),
            })
            .await
            .expect("analyze")
            .into_inner();
        assert_eq!(stats.last_seq, 60, "{id}");
    }
    drop(b);
}

/// `DeleteDevice` on a cluster: devices A holds, one of them keyed in hex, are
/// deleted through B (each deletion's script runs on the master of the device's
/// slot, where its three keys are), so their snapshots are gone, `Analyze` answers
/// `NOT_FOUND` on both, and the devices start again from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_deleted_on_the_master_of_their_slot() {
    let cluster = RedisCluster::start();
    let ids = vec![
        "pump-1".to_owned(),
        "pump-2".to_owned(),
        "valve{7}".to_owned(),
    ];
    let (a, b) = (replica(&cluster), replica(&cluster));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    for seq in 1..=5 {
        send_retrying(&mut ca, &round(&ids, seq)).await;
    }
    wait_for_flush(&cluster, &ids, 5).await;
    for id in &ids {
        let deleted = cb
            .delete_device(DeleteDeviceRequest {
                device_id: id.clone(),
            })
            .await
            .expect("delete")
            .into_inner();
        assert!(deleted.deleted, "{id}");
        assert!(cluster.snapshot(id).await.is_none(), "{id}");
        let tombstone = cluster.get(&fence::version_key(id)).await;
        assert!(tombstone.is_some(), "{id}: no tombstone");
        for client in [&mut ca, &mut cb] {
            let status = client
                .analyze(AnalyzeRequest {
                    device_id: id.clone(),
                })
                .await
                .expect_err("deleted");
            assert_eq!(status.code(), tonic::Code::NotFound, "{id}");
        }
    }
    // Samples after the deletion start each device afresh, on either replica.
    let again = send_retrying(&mut ca, &round(&ids, 6)).await;
    for verdict in &again {
        assert!(verdict.error.is_empty(), "{}", verdict.error);
    }
    wait_for_flush(&cluster, &ids, 6).await;
    for id in &ids {
        let state = cluster.snapshot(id).await.expect("written again");
        assert_eq!(state.last_seq, 6, "{id}");
    }
    drop((a, b));
}
