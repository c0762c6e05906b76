//! `GET /anomalies`: the live anomaly feed as Server-Sent Events, with the filters and
//! bounds of `WatchAnomalies` and `Last-Event-ID` resume.
//!
//! A recorder task, started by the first client, subscribes to the anomaly broadcast,
//! numbers every event (1, 2, 3, ... for the life of the process), keeps the last
//! `FEED_REPLAY_BUFFER` of them in a ring and hands them to the clients through a
//! broadcast of its own. A client that sends `Last-Event-ID: N` (a browser's
//! `EventSource` does when it reconnects) first gets the ring's events after `N` that
//! pass its filter, then the live ones, with neither a gap nor a repeat between the
//! two: joining and recording take the same lock.
//!
//! Anomalies are broadcast only while someone watches (the ingest path skips the work
//! otherwise), so the recorder keeps one watcher open for `FEED_RESUME_WINDOW` after
//! the last client left: a client that reconnects within it resumes without a gap.
//! Then the recorder stops; anomalies while it is stopped are in no buffer.
//!
//! Every event is `id: N`, `event: anomaly`, `data:` the `WatchAnomaliesResponse`
//! JSON, whose `missed` counts the events this client lost before it (the ring had
//! dropped them when it resumed, or it fell behind the live feed). At shutdown the
//! feed sends `event: error` with the `unavailable` error JSON and ends.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    extract::{Extension, RawQuery, State},
    http::{HeaderMap, header::HeaderName},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::Stream;
use tidewatch_proto::v1::{WatchAnomaliesRequest, WatchAnomaliesResponse};
use tokio::sync::broadcast::{self, error::RecvError};

use super::schema_names::ErrorBody;
use crate::{
    AnomalyEvent, AppState,
    error::{ApiError, ErrorKind},
    grpc::watch::{admit, admit_principal, refused, wanted},
    security::policy::Principal,
    telemetry::{ActiveGauge, Transport},
};

/// How often an idle connection gets a comment line, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a browser's `EventSource` waits before reconnecting (the `retry:` field).
const RECONNECT: Duration = Duration::from_secs(1);

/// The `Last-Event-ID` request header.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// One recorded anomaly with its feed id.
#[derive(Debug, Clone)]
struct Entry {
    /// Position in the feed: 1 for the first event the process recorded.
    id: u64,
    /// Events the recorder itself lost just before this one (it fell behind the
    /// anomaly broadcast).
    missed: u64,
    /// The anomaly.
    event: Arc<AnomalyEvent>,
}

/// The feed behind `GET /anomalies`: recorder, replay ring and live broadcast.
#[derive(Debug)]
pub(crate) struct Feed {
    state: Arc<AppState>,
    inner: Mutex<Inner>,
    /// Recorded events to the connected clients (`WATCH_BUFFER` deep, as for gRPC
    /// watchers).
    live: broadcast::Sender<Entry>,
}

#[derive(Debug)]
struct Inner {
    /// The last `FEED_REPLAY_BUFFER` events, oldest first.
    ring: VecDeque<Entry>,
    /// The id of the next recorded event.
    next_id: u64,
    /// Lost by the recorder, to put on the next event.
    pending_missed: u64,
    /// Connected clients.
    clients: usize,
    /// Whether the recorder task runs.
    recording: bool,
    /// The watcher the recorder holds while it has no client (each client holds its
    /// own).
    idle_gauge: Option<ActiveGauge>,
    /// When the last client left.
    idle_since: Instant,
}

impl Feed {
    /// A feed with no client and no recorder yet.
    pub(crate) fn new(state: Arc<AppState>) -> Arc<Self> {
        let (live, _) = broadcast::channel(state.config.watch_buffer);
        Arc::new(Self {
            inner: Mutex::new(Inner {
                ring: VecDeque::new(),
                next_id: 1,
                pending_missed: 0,
                clients: 0,
                recording: false,
                idle_gauge: None,
                idle_since: Instant::now(),
            }),
            live,
            state,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot panic halfway; a poisoned lock still holds a
        // consistent feed.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a client with its filter and resume point: the events to replay, how
    /// many it missed before them, and the live receiver that continues right after.
    fn join(self: &Arc<Self>, filter_len: usize, last_id: Option<u64>) -> Result<Joined, ApiError> {
        let gauge = match admit(&self.state, filter_len) {
            Ok(gauge) => gauge,
            // At the limit, the watcher the idle recorder holds is this client's to
            // take: the recorder needs none while a client is connected.
            Err(e) if e.kind == ErrorKind::Overloaded => match self.lock().idle_gauge.take() {
                Some(gauge) => gauge,
                None => return Err(refused(&self.state, Transport::Http, e)),
            },
            Err(e) => return Err(refused(&self.state, Transport::Http, e)),
        };
        let mut inner = self.lock();
        inner.clients += 1;
        inner.idle_gauge = None;
        if !inner.recording && !self.state.shutdown.is_cancelled() {
            inner.recording = true;
            // Subscribed under the lock: nothing broadcast after this join is missed.
            let receiver = self.state.anomalies.subscribe();
            tokio::spawn(Arc::clone(self).record(receiver));
        }
        let mut missed = 0;
        let replay = match last_id {
            Some(last) => {
                if let Some(oldest) = inner.ring.front()
                    && oldest.id > last.saturating_add(1)
                    && last < inner.next_id
                {
                    missed = oldest.id - last - 1;
                }
                inner.ring.iter().filter(|e| e.id > last).cloned().collect()
            }
            None => Vec::new(),
        };
        let live = self.live.subscribe();
        drop(inner);
        Ok(Joined {
            replay,
            missed,
            live,
            gauge,
            leave: Leave(Arc::clone(self)),
        })
    }

    /// The recorder: numbers and keeps every anomaly until shutdown, or until no
    /// client has been connected for `FEED_RESUME_WINDOW`.
    async fn record(self: Arc<Self>, mut receiver: broadcast::Receiver<Arc<AnomalyEvent>>) {
        let window = self.state.config.feed_resume_window;
        let mut check = tokio::time::interval(
            (window / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.state.shutdown.cancelled() => break,
                received = receiver.recv() => match received {
                    Ok(event) => self.push(event),
                    Err(RecvError::Lagged(n)) => {
                        self.state.metrics.record_watch_missed(n);
                        self.lock().pending_missed += n;
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = check.tick() => {
                    let mut inner = self.lock();
                    if inner.clients == 0 && inner.idle_since.elapsed() >= window {
                        inner.recording = false;
                        inner.idle_gauge = None;
                        return;
                    }
                }
            }
        }
        let mut inner = self.lock();
        inner.recording = false;
        inner.idle_gauge = None;
    }

    /// Numbers an event, keeps it in the ring and sends it to the live clients.
    fn push(&self, event: Arc<AnomalyEvent>) {
        let capacity = self.state.config.feed_replay_buffer;
        let mut inner = self.lock();
        let entry = Entry {
            id: inner.next_id,
            missed: std::mem::take(&mut inner.pending_missed),
            event,
        };
        inner.next_id += 1;
        if inner.ring.len() >= capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(entry.clone());
        // Sent under the lock, so a joining client's replay and live feed meet exactly.
        // An error only means no client is connected right now.
        let _ = self.live.send(entry);
    }
}

/// A client's start: replay, what it missed before it, live feed, its watcher.
struct Joined {
    replay: Vec<Entry>,
    missed: u64,
    live: broadcast::Receiver<Entry>,
    gauge: ActiveGauge,
    leave: Leave,
}

/// Counts a client out when its stream is dropped; the last one out hands the
/// recorder a watcher of its own, so recording goes on for resumers.
struct Leave(Arc<Feed>);

impl Drop for Leave {
    fn drop(&mut self) {
        let feed = &self.0;
        let mut inner = feed.lock();
        inner.clients -= 1;
        if inner.clients == 0 {
            inner.idle_since = Instant::now();
            if inner.recording {
                inner.idle_gauge = Some(feed.state.metrics.open_watcher());
            }
        }
    }
}

/// The filter and resume point of a request.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FeedQuery {
    /// The `WatchAnomalies` filter: repeated `device_id` and `metric` parameters.
    pub(crate) filter: WatchAnomaliesRequest,
    /// `last_event_id` (the `Last-Event-ID` header wins over it).
    pub(crate) last_event_id: Option<u64>,
}

impl FeedQuery {
    /// Parses `device_id=a&device_id=b&metric=rps&last_event_id=7`; other
    /// parameters are ignored, as on the other routes.
    pub(crate) fn parse(query: &str) -> Result<Self, ApiError> {
        let mut parsed = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "device_id" | "deviceId" => parsed.filter.device_ids.push(value.into_owned()),
                "metric" => parsed.filter.metrics.push(value.into_owned()),
                "last_event_id" => parsed.last_event_id = Some(event_id(&value)?),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// A feed event id: a decimal integer.
fn event_id(value: &str) -> Result<u64, ApiError> {
    value.trim().parse().map_err(|_| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("last event id {value:?} is not a non-negative integer"),
        )
    })
}

/// `GET /anomalies`.
#[utoipa::path(
    get,
    path = "/anomalies",
    tag = "query",
    params(
        ("device_id" = Option<Vec<String>>, Query, style = Form, explode,
         description = "Only these devices (repeat the parameter); none means all"),
        ("metric" = Option<Vec<String>>, Query, style = Form, explode,
         description = "Only verdicts where one of these metrics is anomalous"),
        ("last_event_id" = Option<u64>, Query,
         description = "Resume after this event id (the Last-Event-ID header wins)"),
        ("Last-Event-ID" = Option<u64>, Header,
         description = "Resume after this event id, within FEED_REPLAY_BUFFER events"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id`, `event: anomaly`, `data`: \
                                      a WatchAnomaliesResponse JSON; `event: error` at \
                                      shutdown", content_type = "text/event-stream",
         body = String),
        (status = 400, description = "A bad parameter, or a filter larger than \
                                      MAX_WATCH_FILTER", body = ErrorBody),
        (status = 503, description = "MAX_WATCHERS watchers are open; retry after \
                                      Retry-After", body = ErrorBody),
    )
)]
pub(crate) async fn anomalies(
    State(feed): State<Arc<Feed>>,
    Extension(principal): Extension<Arc<Principal>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match open(&feed, principal, query.as_deref().unwrap_or(""), &headers) {
        Ok(stream) => Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Checks the request, joins the feed and returns the client's event stream.
fn open(
    feed: &Arc<Feed>,
    principal: Arc<Principal>,
    query: &str,
    headers: &HeaderMap,
) -> Result<impl Stream<Item = Result<Event, Infallible>> + use<>, ApiError> {
    let mut query = FeedQuery::parse(query)?;
    if let Some(header) = headers.get(LAST_EVENT_ID) {
        let value = header.to_str().map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                "Last-Event-ID is not visible ASCII",
            )
        })?;
        query.last_event_id = Some(event_id(value)?);
    }
    let filter = query.filter;
    let slot = admit_principal(&feed.state, &principal, &filter.device_ids)?;
    let filter_len = filter.device_ids.len() + filter.metrics.len();
    let Joined {
        replay,
        missed,
        mut live,
        gauge,
        leave,
    } = feed.join(filter_len, query.last_event_id)?;
    let state = Arc::clone(&feed.state);
    Ok(async_stream::stream! {
        // Dropped in reverse order: the client is counted out before its watcher
        // closes, so the recorder never goes without one.
        let _gauge = gauge;
        let _leave = leave;
        let _slot = slot;
        let wanted = |filter: &_, event: &Arc<AnomalyEvent>| {
            wanted(filter, event) && principal.may_touch(&event.verdict.device_id)
        };
        let mut missed = missed;
        yield Ok(Event::default().retry(RECONNECT).comment("tidewatch anomaly feed"));
        for entry in replay {
            missed += entry.missed;
            if wanted(&filter, &entry.event) {
                yield Ok(event(&entry, std::mem::take(&mut missed)));
            }
        }
        loop {
            tokio::select! {
                biased;
                () = state.shutdown.cancelled() => {
                    yield Ok(shutdown_event());
                    break;
                }
                received = live.recv() => match received {
                    Ok(entry) => {
                        missed += entry.missed;
                        if wanted(&filter, &entry.event) {
                            yield Ok(event(&entry, std::mem::take(&mut missed)));
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        state.metrics.record_watch_missed(n);
                        missed += n;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
    })
}

/// The SSE event of one anomaly.
fn event(entry: &Entry, missed: u64) -> Event {
    let response = WatchAnomaliesResponse {
        verdict: Some(entry.event.verdict.clone()),
        missed,
        time: Some(entry.event.time),
    };
    let data = serde_json::to_string(&response).unwrap_or_else(|e| {
        tracing::error!(error = %e, "anomaly event serialization failed");
        String::from("{}")
    });
    Event::default()
        .id(entry.id.to_string())
        .event("anomaly")
        .data(data)
}

/// The last event of every stream at shutdown.
fn shutdown_event() -> Event {
    let error = ApiError::new(ErrorKind::Unavailable, "server is shutting down; reconnect");
    let data = serde_json::json!({
        "error": {"code": error.kind.as_str(), "message": error.message},
    });
    Event::default().event("error").data(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let q =
            FeedQuery::parse("device_id=a&metric=rps&device_id=b%20c&x=1&last_event_id=7").unwrap();
        assert_eq!(q.filter.device_ids, ["a", "b c"]);
        assert_eq!(q.filter.metrics, ["rps"]);
        assert_eq!(q.last_event_id, Some(7));
        assert_eq!(FeedQuery::parse("").unwrap(), FeedQuery::default());
        let e = FeedQuery::parse("last_event_id=-1").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
