//! The request core: what every transport shares ([`AppState`]) and the one way each
//! request is judged or analyzed, whether it came over gRPC or the HTTP gateway.
//!
//! Judging has two entry points:
//!
//! - [`AppState::judge_now`], synchronous: judges as much of a request as can be
//!   judged without waiting, in one pass, into any [`VerdictSink`]. The gRPC fast path
//!   calls it per message with its wire samples and encoder; the gateway calls it with
//!   the parsed `Sample`s.
//! - [`AppState::judge`], asynchronous: judges what [`AppState::judge_now`] left,
//!   restoring missing devices from their snapshots first and moving large batches to
//!   the blocking pool.
//!
//! Both end in the same private core, so restore-before-judge, metrics and the
//! anomaly broadcast happen the same way for every transport. The rules the engine
//! applies are in `docs/architecture.md`, "Engine semantics"; why a device is restored
//! before its first sample is judged is in its "Snapshot protocol".

use std::{
    collections::HashSet,
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use anyhow::Context as _;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{
        AnalyzeRequest, AnalyzeResponse, DeleteDeviceRequest, DeleteDeviceResponse, Sample, Source,
        Verdict,
    },
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    engine::{
        AnomalyKeeper, DetectorSpec, Engine, Owner, SampleLike, Tee, VerdictSink, analyze_response,
        normalize_device_id, now_timestamp,
    },
    error::{ApiError, ErrorKind, SampleError},
    intake::IntakeRules,
    security::{
        Security,
        policy::{Principal, Scope},
    },
    snapshot::{DeleteError, SnapshotConfig, Snapshots},
    telemetry::{self, Metrics, Transport, trace::Tracing},
};

/// Whose `devices` quota counts the devices `principal`'s samples create: nobody's
/// when it has no such quota (or authentication is off).
fn owner(principal: &Principal) -> Option<Owner<'_>> {
    principal.quota.devices.map(|limit| Owner {
        name: &principal.name,
        limit,
    })
}

/// Requests with at least this many samples are judged on the blocking pool, so that
/// a 10,000-sample batch does not hold a runtime worker for milliseconds.
const BLOCKING_BATCH: usize = 2048;

/// Restore-then-judge rounds for one request with snapshots (see [`AppState::judge`]).
const RESTORE_ROUNDS: usize = 3;

/// One anomalous verdict on its way to watchers.
#[derive(Debug, Clone)]
pub struct AnomalyEvent {
    /// The verdict, as the ingesting client got it.
    pub verdict: Verdict,
    /// When the server judged it.
    pub time: Timestamp,
}

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The settings the server runs with.
    pub config: Arc<Config>,
    /// The windows.
    pub engine: Arc<Engine>,
    /// Metrics and their exposition.
    pub metrics: Metrics,
    /// Server spans, when traces are exported.
    pub tracing: Tracing,
    /// The anomaly feed; ingestion sends, watchers subscribe.
    pub anomalies: broadcast::Sender<Arc<AnomalyEvent>>,
    /// Cancelled when shutdown starts; every stream selects on it.
    pub shutdown: CancellationToken,
    /// Readiness: false while starting and while draining (`/readyz`).
    pub ready: AtomicBool,
    /// Redis snapshots, when `REDIS_URL` is set.
    pub snapshots: Option<Arc<Snapshots>>,
    /// TLS, authentication, per-principal quotas.
    pub security: Arc<Security>,
    /// The bounds on request data still arriving (`MAX_INCOMPLETE_BYTES`,
    /// `MIN_UPLOAD_RATE`), shared by both listeners.
    pub intake: Arc<IntakeRules>,
}

/// How far [`AppState::judge_now`] got through a request.
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    /// How many samples, from the start, were judged; the rest goes to
    /// [`AppState::judge`].
    pub count: usize,
    /// The clock read that ended the judging (the message's latency, when it was
    /// judged whole). A caller judging its next message right away starts that one
    /// from it: one clock read per message.
    pub finished: Instant,
}

impl AppState {
    /// Builds the shared state for `config`.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let engine = Arc::new(Engine::new(config.engine()));
        let otel = config.otel()?;
        let resource = telemetry::resource(&otel);
        let metrics = Metrics::new(Arc::clone(&engine), &otel, resource.clone())?;
        let tracing = Tracing::new(&otel, resource)?;
        let (anomalies, _) = broadcast::channel(config.watch_buffer);
        let snapshots = match SnapshotConfig::from_config(&config) {
            Some(snapshot_config) => Some(Arc::new(
                Snapshots::new(
                    snapshot_config,
                    Arc::clone(&engine),
                    metrics.shared_counters(),
                )
                .context("REDIS_URL")?,
            )),
            None => None,
        };
        let security = Arc::new(Security::from_config(&config)?);
        let intake = Arc::new(IntakeRules::new(
            config.max_incomplete_bytes,
            config.min_upload_rate,
            config.min_upload_rate_grace,
        ));
        Ok(Self {
            security,
            intake,
            config: Arc::new(config),
            engine,
            metrics,
            tracing,
            anomalies,
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(false),
            snapshots,
        })
    }

    /// Judges the samples of one request into `out`, from the start, as far as that
    /// needs no waiting: all of them in the usual case (a small batch of devices in
    /// memory). It stops before the first sample of a device that must be restored from
    /// its snapshot first (with snapshots on), and judges nothing of a batch of
    /// `BLOCKING_BATCH` samples or more (that one belongs on the blocking pool). What
    /// is left goes to [`AppState::judge`], its verdicts after the ones in `out`.
    ///
    /// `received` is the message's one clock read: the engine's idle tick, the receive
    /// time and the start of its latency. `detector` comes from
    /// [`Engine::detector`] (the stream's or request's detector section, or the
    /// server default).
    pub fn judge_now<S: SampleLike>(
        &self,
        principal: &Principal,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        transport: Transport,
        received: Instant,
        out: &mut impl VerdictSink,
    ) -> Judged {
        let samples = samples.into_iter();
        if samples.len() >= BLOCKING_BATCH {
            return Judged {
                count: 0,
                finished: received,
            };
        }
        let restore = self.snapshots.is_some();
        self.judge_into(
            principal, samples, detector, transport, received, out, restore,
        )
    }

    /// Judges what [`AppState::judge_now`] left of a request, waiting where needed:
    /// devices that are not in memory are restored from their snapshots first (a
    /// device's first sample here continues the window its snapshot holds), and a
    /// batch of `BLOCKING_BATCH` samples or more runs on the blocking pool.
    pub async fn judge(
        self: Arc<Self>,
        principal: Arc<Principal>,
        samples: Vec<Sample>,
        detector: DetectorSpec,
        transport: Transport,
    ) -> Vec<Verdict> {
        let Some(snapshots) = self.snapshots.clone() else {
            return self
                .judge_blocking(principal, samples, detector, transport)
                .await;
        };
        // A device restored here can be handed to another replica before its samples
        // are judged: judging stops at a device that is no longer in memory, and that
        // device is taken back (restored again) first. The last round judges what is
        // left whatever happens (a device Redis could not give starts fresh).
        let mut verdicts = Vec::with_capacity(samples.len());
        let mut moved = HashSet::new();
        let mut at = 0;
        // Restored devices count against the caller's `devices` quota as created ones do.
        let holder = principal
            .quota
            .devices
            .map(|limit| (Arc::clone(&principal.name), limit));
        for round in 0..RESTORE_ROUNDS {
            let rest = &samples[at..];
            let full = holder
                .as_ref()
                .is_some_and(|(name, limit)| self.engine.devices_held(name) >= *limit);
            if full {
                // Nothing is read for a caller whose quota has no room: its samples of
                // devices not in memory are refused (`device_quota`) when judged.
            } else if principal.devices.is_everything() {
                moved.extend(snapshots.restore_missing(rest, holder.clone()).await);
            } else {
                // A device outside the caller's namespace is refused, never loaded.
                let allowed: Vec<Sample> = rest
                    .iter()
                    .filter(|s| principal.may_touch(normalize_device_id(&s.device_id)))
                    .cloned()
                    .collect();
                moved.extend(snapshots.restore_missing(&allowed, holder.clone()).await);
            }
            let last = round + 1 == RESTORE_ROUNDS;
            at += if samples.len() - at >= BLOCKING_BATCH && moved.is_empty() {
                let state = Arc::clone(&self);
                let principal = Arc::clone(&principal);
                let rest = samples[at..].to_vec();
                let judged = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(rest.len());
                    let count = state.judge_except(
                        &principal,
                        &rest,
                        &detector,
                        transport,
                        &HashSet::new(),
                        !last,
                        &mut out,
                    );
                    (out, count)
                })
                .await;
                match judged {
                    Ok((out, count)) => {
                        verdicts.extend(out);
                        count
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ingest batch task failed");
                        return Vec::new();
                    }
                }
            } else {
                self.judge_except(
                    &principal,
                    &samples[at..],
                    &detector,
                    transport,
                    &moved,
                    !last,
                    &mut verdicts,
                )
            };
            if at == samples.len() {
                break;
            }
        }
        verdicts
    }

    /// Judges `samples` without snapshots: on the blocking pool when there are many.
    async fn judge_blocking(
        self: Arc<Self>,
        principal: Arc<Principal>,
        samples: Vec<Sample>,
        detector: DetectorSpec,
        transport: Transport,
    ) -> Vec<Verdict> {
        if samples.len() < BLOCKING_BATCH {
            return self.judge_all(&principal, &samples, &detector, transport);
        }
        let state = Arc::clone(&self);
        match tokio::task::spawn_blocking(move || {
            state.judge_all(&principal, &samples, &detector, transport)
        })
        .await
        {
            Ok(verdicts) => verdicts,
            Err(e) => {
                // Only a panic in the engine gets here; the task is gone with its batch.
                tracing::error!(error = %e, "ingest batch task failed");
                Vec::new()
            }
        }
    }

    /// `Analyze`: the device's statistics from memory, else from its snapshot (`source`
    /// says which), else `NOT_FOUND`; `UNAVAILABLE` when only Redis could tell and it
    /// does not answer. The gRPC method and the gateway's `GET /analyze` both serve it.
    pub async fn analyze(
        &self,
        principal: &Principal,
        request: &AnalyzeRequest,
    ) -> Result<AnalyzeResponse, ApiError> {
        principal.require(Scope::Analyze)?;
        let id = normalize_device_id(&request.device_id);
        // Refused before any lookup: the answer says nothing of whether it exists.
        principal.require_device(id)?;
        if let Some(found) = self.engine.analyze(id) {
            return Ok(found);
        }
        if let Some(snapshots) = &self.snapshots {
            match snapshots.read(id).await {
                Ok(Some(device)) => return Ok(analyze_response(&device, Source::Snapshot)),
                Ok(None) => {}
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "device {id:?} is not in memory and the snapshot store does not answer; retry"
                        ),
                    ));
                }
            }
        }
        Err(ApiError::new(
            ErrorKind::NotFound,
            format!("device {id:?} is unknown: no sample in memory and no snapshot"),
        ))
    }

    /// `DeleteDevice`: removes a device's state from memory, on every replica, and
    /// from Redis (`docs/snapshots.md`, "Deleting a device"); `deleted` says whether
    /// it had any. Needs the `admin` scope; a device outside the caller's namespace is
    /// refused before any lookup, so the answer says nothing of whether it exists.
    /// The gRPC method and the gateway's `DELETE /devices/{id}` both serve it.
    pub async fn delete_device(
        &self,
        principal: &Principal,
        request: &DeleteDeviceRequest,
    ) -> Result<DeleteDeviceResponse, ApiError> {
        principal.require(Scope::Admin)?;
        let id = normalize_device_id(&request.device_id);
        principal.require_device(id)?;
        let limit = self.engine.config().max_device_id_len;
        if id.len() > limit {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "device id is {} bytes; limit is {limit} (MAX_DEVICE_ID_LEN)",
                    id.len()
                ),
            ));
        }
        let deleted = match &self.snapshots {
            None => self.engine.remove(id).is_some(),
            Some(snapshots) => match snapshots.delete(id).await {
                Ok(deleted) => deleted.existed,
                Err(e @ DeleteError::Held(_)) => {
                    return Err(ApiError::new(ErrorKind::Unavailable, e.to_string()));
                }
                Err(DeleteError::Store(_)) => {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "device {id:?} was not deleted: the snapshot store does not answer; retry"
                        ),
                    ));
                }
            },
        };
        if deleted {
            self.metrics
                .shared_counters()
                .devices_deleted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(device_id = id, principal = %principal.name, deleted, "device deletion done");
        Ok(DeleteDeviceResponse {
            device_id: id.to_owned(),
            deleted,
        })
    }

    /// Judges `samples` into `out` in order, except that the samples of the devices
    /// in `moved` (another replica holds them) are not judged: their verdicts carry
    /// the `moved` error, and the client sends them again (`docs/architecture.md`,
    /// "Replicas"). With `stop_at_unknown`, stops before the first sample of a device
    /// not in memory. Returns how many samples it answered.
    #[allow(clippy::too_many_arguments)]
    fn judge_except(
        &self,
        principal: &Principal,
        samples: &[Sample],
        detector: &DetectorSpec,
        transport: Transport,
        moved: &HashSet<Box<str>>,
        stop_at_unknown: bool,
        out: &mut Vec<Verdict>,
    ) -> usize {
        let mut at = 0;
        while at < samples.len() {
            let rest = &samples[at..];
            let held = |s: &Sample| moved.contains(normalize_device_id(&s.device_id));
            let run = if moved.is_empty() {
                rest.len()
            } else {
                rest.iter().position(held).unwrap_or(rest.len())
            };
            if run > 0 {
                let judged = self
                    .judge_into(
                        principal,
                        &rest[..run],
                        detector,
                        transport,
                        Instant::now(),
                        out,
                        stop_at_unknown,
                    )
                    .count;
                at += judged;
                if judged < run {
                    return at;
                }
                continue;
            }
            let sample = &rest[0];
            let device = normalize_device_id(&sample.device_id);
            out.error(
                device.as_bytes(),
                sample.seq,
                &SampleError::Moved {
                    device: device.to_owned(),
                },
            );
            self.metrics.record_rejected_request(transport, "moved", 1);
            at += 1;
        }
        at
    }

    /// Every sample of `samples`, none held back for a restore (the caller restored
    /// them), starting the clock now.
    fn judge_all(
        &self,
        principal: &Principal,
        samples: &[Sample],
        detector: &DetectorSpec,
        transport: Transport,
    ) -> Vec<Verdict> {
        let mut verdicts = Vec::with_capacity(samples.len());
        let _ = self.judge_into(
            principal,
            samples,
            detector,
            transport,
            Instant::now(),
            &mut verdicts,
            false,
        );
        verdicts
    }

    /// [`AppState::judge_run`] for the samples of devices inside `principal`'s
    /// namespace; each sample of a device outside it gets a `permission_denied` error
    /// in its place, and nothing of it is read or changed. A principal that may touch
    /// every device (the usual case) goes straight through.
    #[allow(clippy::too_many_arguments)]
    fn judge_into<S: SampleLike>(
        &self,
        principal: &Principal,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        transport: Transport,
        started: Instant,
        out: &mut impl VerdictSink,
        stop_at_unknown: bool,
    ) -> Judged {
        let owner = owner(principal);
        if principal.devices.is_everything() {
            return self.judge_run(
                samples,
                detector,
                transport,
                started,
                out,
                stop_at_unknown,
                owner,
            );
        }
        let mut samples = samples.into_iter();
        let mut run: Vec<S> = Vec::with_capacity(samples.len());
        let (mut count, mut finished, mut denied) = (0, started, 0);
        let judged = loop {
            let next = samples.next();
            if let Some(sample) = next.as_ref()
                && std::str::from_utf8(sample.device_id())
                    .is_ok_and(|id| principal.may_touch(normalize_device_id(id)))
            {
                run.extend(next);
                continue;
            }
            let len = run.len();
            if len > 0 {
                let judged = self.judge_run(
                    run.drain(..),
                    detector,
                    transport,
                    finished,
                    out,
                    stop_at_unknown,
                    owner,
                );
                count += judged.count;
                finished = judged.finished;
                if judged.count < len {
                    break Judged { count, finished };
                }
            }
            let Some(sample) = next else {
                break Judged { count, finished };
            };
            let device = String::from_utf8_lossy(sample.device_id()).into_owned();
            let error = SampleError::PermissionDenied {
                device,
                principal: principal.name.to_string(),
            };
            out.error(sample.device_id(), sample.seq(), &error);
            count += 1;
            denied += 1;
        };
        if denied > 0 {
            self.metrics
                .record_rejected_request(transport, "permission_denied", denied);
        }
        judged
    }

    /// The core under both entry points: engine, metrics once per message, anomaly
    /// broadcast. Judges all of `samples` unless `stop_at_unknown` (see
    /// [`Engine::ingest_batch_with`]). While anomaly watchers are subscribed, the
    /// anomalous verdicts are also kept as prost messages for them (unless `out` keeps them
    /// already). The message's latency is recorded when it is judged whole here. The
    /// devices it creates count against `owner`'s `devices` quota.
    #[allow(clippy::too_many_arguments)]
    fn judge_run<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        transport: Transport,
        started: Instant,
        out: &mut impl VerdictSink,
        stop_at_unknown: bool,
        owner: Option<Owner<'_>>,
    ) -> Judged {
        let samples = samples.into_iter();
        let total = samples.len();
        let engine = &self.engine;
        let (outcome, count) = if !self.metrics.watching() {
            engine.ingest_batch_for(samples, detector, out, started, stop_at_unknown, owner)
        } else if let Some(before) = out.verdicts().map(<[Verdict]>::len) {
            let result =
                engine.ingest_batch_for(samples, detector, out, started, stop_at_unknown, owner);
            let verdicts = out.verdicts().unwrap_or_default();
            self.publish_anomalies(&verdicts[before.min(verdicts.len())..], result.0.anomalies);
            result
        } else {
            let mut kept = AnomalyKeeper::default();
            let result = engine.ingest_batch_for(
                samples,
                detector,
                &mut Tee(out, &mut kept),
                started,
                stop_at_unknown,
                owner,
            );
            self.publish_anomalies(&kept.kept, result.0.anomalies);
            result
        };
        let finished = Instant::now();
        let latency = (count == total).then(|| finished.saturating_duration_since(started));
        self.metrics.record_batch(transport, &outcome, latency);
        Judged { count, finished }
    }

    /// Sends the anomalous verdicts of a batch to watchers, if there are any.
    fn publish_anomalies(&self, verdicts: &[Verdict], anomalies: u64) {
        if anomalies == 0 || self.anomalies.receiver_count() == 0 {
            return;
        }
        let time = now_timestamp();
        for verdict in verdicts.iter().filter(|v| v.anomaly) {
            // An error means no watcher is left; nobody to tell.
            let _ = self.anomalies.send(Arc::new(AnomalyEvent {
                verdict: verdict.clone(),
                time,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(device: &str, seq: u64) -> Sample {
        Sample {
            device_id: device.into(),
            time: None,
            metrics: [("t".to_owned(), seq as f64)].into(),
            seq,
        }
    }

    fn state(redis_url: Option<&str>) -> Arc<AppState> {
        let mut config = Config::defaults();
        config.redis_url = redis_url.map(str::to_owned);
        config.redis_connect_timeout = Duration::from_millis(200);
        config.redis_command_timeout = Duration::from_millis(200);
        Arc::new(AppState::new(config).expect("state"))
    }

    fn judge_now(state: &AppState, samples: &[Sample], out: &mut Vec<Verdict>) -> usize {
        let detector = state.engine.default_detector();
        state
            .judge_now(
                &Principal::anonymous(),
                samples,
                &detector,
                Transport::Http,
                Instant::now(),
                out,
            )
            .count
    }

    fn tenant(devices: &str) -> Arc<Principal> {
        Arc::new(Principal {
            name: "tenant-a".into(),
            devices: crate::security::policy::DeviceNamespace::parse([devices]).unwrap(),
            ..Principal::anonymous()
        })
    }

    #[tokio::test]
    async fn without_snapshots_a_small_request_is_judged_at_once() {
        let state = state(None);
        let samples = [sample("a", 1), sample("b", 1), sample("a", 2)];
        let mut out = Vec::new();
        assert_eq!(judge_now(&state, &samples, &mut out), 3);
        assert_eq!(out.len(), 3);
        assert_eq!(state.metrics.samples(Transport::Http), 3);
    }

    #[tokio::test]
    async fn a_large_batch_waits_for_the_blocking_pool() {
        let state = state(None);
        let samples: Vec<Sample> = (1..=BLOCKING_BATCH as u64)
            .map(|seq| sample("a", seq))
            .collect();
        let mut out = Vec::new();
        assert_eq!(judge_now(&state, &samples, &mut out), 0);
        assert!(out.is_empty() && !state.engine.contains("a"));
        let detector = state.engine.default_detector();
        let verdicts = Arc::clone(&state)
            .judge(
                Arc::new(Principal::anonymous()),
                samples,
                detector,
                Transport::Http,
            )
            .await;
        assert_eq!(verdicts.len(), BLOCKING_BATCH);
        assert_eq!(verdicts.last().map(|v| v.seq), Some(BLOCKING_BATCH as u64));
    }

    /// With snapshots, the sync way stops before the first sample of a device that is
    /// not in memory; the async way restores (here: Redis refuses, so the device starts
    /// fresh) and judges the rest, in order.
    #[tokio::test]
    async fn with_snapshots_an_unknown_device_is_left_to_the_async_way() {
        let state = state(Some("redis://127.0.0.1:1"));
        state.engine.ingest_batch(
            &[sample("a", 1)],
            &state.engine.default_detector(),
            &mut Vec::new(),
        );
        let mut samples = vec![sample("a", 2), sample("b", 1), sample("a", 3)];
        let mut out = Vec::new();
        let count = judge_now(&state, &samples, &mut out);
        assert_eq!(count, 1);
        assert!(!state.engine.contains("b"));
        let rest = samples.split_off(count);
        let detector = state.engine.default_detector();
        out.extend(
            Arc::clone(&state)
                .judge(
                    Arc::new(Principal::anonymous()),
                    rest,
                    detector,
                    Transport::Http,
                )
                .await,
        );
        let order: Vec<(&str, u64)> = out.iter().map(|v| (&*v.device_id, v.seq)).collect();
        assert_eq!(order, [("a", 2), ("b", 1), ("a", 3)]);
        assert!(state.engine.contains("b"));
    }

    /// Samples of devices outside the caller's namespace get `permission_denied` in
    /// their place and leave no trace; the others are judged in order around them,
    /// through both ways in (the async one after a stop for a restore).
    #[tokio::test]
    async fn devices_outside_the_namespace_are_refused_per_sample() {
        let state = state(Some("redis://127.0.0.1:1"));
        let principal = tenant("a/*");
        state.engine.ingest_batch(
            &[sample("a/1", 1)],
            &state.engine.default_detector(),
            &mut Vec::new(),
        );
        let mut samples = vec![
            sample("a/1", 2),
            sample("b/1", 1),
            sample("a/1", 3),
            sample("a/2", 1),
            sample("b/2", 1),
            sample("a/1", 4),
        ];
        let detector = state.engine.default_detector();
        let mut out = Vec::new();
        let count = state
            .judge_now(
                &principal,
                &samples,
                &detector,
                Transport::Http,
                Instant::now(),
                &mut out,
            )
            .count;
        assert_eq!(count, 3, "stops before a/2, which must be restored first");
        let rest = samples.split_off(count);
        out.extend(
            Arc::clone(&state)
                .judge(Arc::clone(&principal), rest, detector, Transport::Http)
                .await,
        );
        let got: Vec<(&str, u64, &str)> = out
            .iter()
            .map(|v| {
                (
                    &*v.device_id,
                    v.seq,
                    v.error.split(':').next().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a/1", 2, ""),
                ("b/1", 1, "permission_denied"),
                ("a/1", 3, ""),
                ("a/2", 1, ""),
                ("b/2", 1, "permission_denied"),
                ("a/1", 4, ""),
            ]
        );
        assert!(!state.engine.contains("b/1") && !state.engine.contains("b/2"));
        assert!(state.engine.contains("a/2"));
    }

    #[tokio::test]
    async fn analyze_outside_the_namespace_does_not_say_whether_the_device_exists() {
        let state = state(None);
        let detector = state.engine.default_detector();
        state
            .engine
            .ingest_batch(&[sample("b/1", 1)], &detector, &mut Vec::new());
        let principal = tenant("a/*");
        for id in ["b/1", "b/never-seen"] {
            let e = state
                .analyze(
                    &principal,
                    &AnalyzeRequest {
                        device_id: id.into(),
                    },
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{id}");
            assert!(!e.message.contains("unknown"), "{}", e.message);
        }
        assert!(
            state
                .analyze(
                    &Principal::anonymous(),
                    &AnalyzeRequest {
                        device_id: "b/1".into()
                    }
                )
                .await
                .is_ok()
        );
    }

    #[test]
    fn only_a_principal_with_a_devices_quota_is_counted() {
        // Without authentication (and for principals without the quota): no owner,
        // so the engine counts nothing.
        assert_eq!(owner(&Principal::anonymous()), None);
        let mut principal = Principal::anonymous();
        principal.quota.streams = Some(2);
        assert_eq!(owner(&principal), None);
        principal.quota.devices = Some(3);
        assert_eq!(
            owner(&principal),
            Some(Owner {
                name: "anonymous",
                limit: 3
            })
        );
    }
}
