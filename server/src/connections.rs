//! Connections of the two main listeners: how many are admitted, which of them are
//! busy, and when an idle one is closed (`docs/operations.md`, "Connections").
//!
//! Each listener admits `MAX_CONNECTIONS` connections. Past that, [`PROBE_HEADROOM`]
//! more are admitted as *probe-only*: they answer liveness, readiness, `/metrics` and
//! gRPC health, refuse everything else (`503` / `UNAVAILABLE`) and are closed after
//! [`PROBE_IDLE`] without a request. When the headroom is full too, a new connection
//! takes the place of the oldest probe-only connection that has no request in
//! progress (that one is closed within [`EVICT_CHECK`]), so idle connections cannot
//! keep a kubelet probe out; only when every probe-only connection is busy is the new
//! one accepted and closed at once: the client learns right away, and the socket does
//! not wait in the backlog. The admin listener (`ADMIN_ADDR`) is outside all of it.
//!
//! A connection is *active* while one of its requests (or streams) is being answered;
//! the [`Activity`] guard a request holds until its response body is done counts it.
//! A connection with no active request for `CONNECTION_IDLE_TIMEOUT` is closed, and
//! so is a new one that has not made its first request within `HEADER_READ_TIMEOUT`
//! (an HTTP/2 client trickling its preface or first header block, say).

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

/// Connections admitted past `MAX_CONNECTIONS` on each listener, probe-only.
pub const PROBE_HEADROOM: usize = 32;

/// A probe-only connection with no request for this long is closed.
pub const PROBE_IDLE: Duration = Duration::from_secs(2);

/// How often a probe-only connection looks whether it was evicted.
pub const EVICT_CHECK: Duration = Duration::from_millis(50);

/// Admission of one listener's connections.
#[derive(Debug)]
pub struct Admission {
    /// `MAX_CONNECTIONS` permits (none: no limit).
    normal: Option<Arc<Semaphore>>,
    /// [`PROBE_HEADROOM`] permits.
    probes: Arc<Semaphore>,
    /// `CONNECTION_IDLE_TIMEOUT` (none: never closed for idleness).
    idle: Option<Duration>,
    /// `HEADER_READ_TIMEOUT`: time a new connection gets to make its first request.
    first_request: Duration,
    /// Connections refused since the start.
    refused: AtomicU64,
    /// The probe-only connections, oldest first (eviction candidates).
    probe_conns: Mutex<VecDeque<Weak<Conn>>>,
}

impl Admission {
    /// `max` connections (0: no limit), idle ones closed after `idle`, new ones
    /// without a request after `first_request`.
    pub fn new(max: usize, idle: Option<Duration>, first_request: Duration) -> Arc<Self> {
        Arc::new(Self {
            normal: (max > 0).then(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))),
            probes: Arc::new(Semaphore::new(PROBE_HEADROOM)),
            idle,
            first_request,
            refused: AtomicU64::new(0),
            probe_conns: Mutex::new(VecDeque::new()),
        })
    }

    /// Takes the permit of the oldest probe-only connection with no request in
    /// progress, which closes within [`EVICT_CHECK`].
    fn evict(&self) -> Option<OwnedSemaphorePermit> {
        let mut conns = self.probe_conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.strong_count() > 0);
        let position = conns.iter().position(|c| {
            c.upgrade()
                .is_some_and(|c| c.active.load(Ordering::Relaxed) == 0)
        })?;
        let victim = conns.remove(position)?.upgrade()?;
        victim.evicted.store(true, Ordering::Relaxed);
        let mut permit = victim.permit.lock().unwrap_or_else(|e| e.into_inner());
        permit.take()
    }

    /// Admits a new connection: normal, probe-only, or `None` (close it now).
    pub fn admit(&self) -> Option<Arc<Conn>> {
        let (permit, probe_only) = match &self.normal {
            None => (None, false),
            Some(normal) => match Arc::clone(normal).try_acquire_owned() {
                Ok(permit) => (Some(permit), false),
                Err(_) => match Arc::clone(&self.probes).try_acquire_owned() {
                    Ok(permit) => (Some(permit), true),
                    Err(_) => match self.evict() {
                        Some(permit) => (Some(permit), true),
                        None => {
                            self.refused.fetch_add(1, Ordering::Relaxed);
                            return None;
                        }
                    },
                },
            },
        };
        let idle = if probe_only {
            Some(self.idle.map_or(PROBE_IDLE, |i| i.min(PROBE_IDLE)))
        } else {
            self.idle
        };
        let conn = Arc::new(Conn {
            probe_only,
            idle,
            first_request: self.first_request,
            used: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
            evicted: AtomicBool::new(false),
            permit: Mutex::new(permit),
        });
        if probe_only {
            self.probe_conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(Arc::downgrade(&conn));
        }
        Some(conn)
    }

    /// Connections refused (past `MAX_CONNECTIONS` and the headroom) since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the first call: a cheap clock for atomics.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One admitted connection: its permit, whether it is probe-only, its activity.
#[derive(Debug)]
pub struct Conn {
    probe_only: bool,
    /// Closed after this long without an active request.
    idle: Option<Duration>,
    /// Closed after this long without a first request.
    first_request: Duration,
    /// A request came.
    used: AtomicBool,
    active: AtomicUsize,
    /// When `active` last fell to 0 ([`now_ms`]).
    idle_since: AtomicU64,
    /// A newer probe-only connection took this one's place: close it.
    evicted: AtomicBool,
    /// Held while the connection (or one of its requests) lives, unless evicted.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Conn {
    /// Past `MAX_CONNECTIONS`: only probes are answered.
    pub fn probe_only(&self) -> bool {
        self.probe_only
    }

    /// Marks a request active until the guard drops.
    pub fn enter(self: &Arc<Self>) -> Activity {
        self.used.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Activity(Arc::clone(self))
    }

    /// How long the connection has had no active request; `None` while it has one.
    fn idle_for(&self) -> Option<Duration> {
        if self.evicted.load(Ordering::Relaxed) {
            return Some(Duration::MAX);
        }
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        Some(Duration::from_millis(now_ms().saturating_sub(since)))
    }

    /// The idle time after which the connection is closed now, if any.
    fn timeout(&self) -> Option<Duration> {
        if self.used.load(Ordering::Relaxed) {
            return self.idle;
        }
        Some(
            self.idle
                .map_or(self.first_request, |i| i.min(self.first_request)),
        )
    }

    /// A watch that is ready once the connection has been idle for its timeout.
    pub fn idle_watch(self: &Arc<Self>) -> Option<IdleWatch> {
        let timeout = self.timeout()?;
        let first = if self.probe_only {
            timeout.min(EVICT_CHECK)
        } else {
            timeout
        };
        Some(IdleWatch {
            conn: Arc::clone(self),
            timer: Box::pin(tokio::time::sleep(first)),
        })
    }
}

/// A request in progress on a connection (see [`Conn::enter`]).
#[derive(Debug)]
pub struct Activity(Arc<Conn>);

impl Drop for Activity {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ready once its connection has had no active request for the idle timeout; the
/// timer is re-armed only when it fires.
#[derive(Debug)]
pub struct IdleWatch {
    conn: Arc<Conn>,
    timer: Pin<Box<Sleep>>,
}

/// How long an idle watch without a timeout sleeps before it looks again.
const NO_TIMEOUT: Duration = Duration::from_secs(3600);

impl IdleWatch {
    /// `Ready` when the connection is to be closed.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let mut left = match (self.conn.timeout(), self.conn.idle_for()) {
                (_, Some(Duration::MAX)) => return Poll::Ready(()),
                (None, _) => NO_TIMEOUT,
                (Some(timeout), Some(idle)) if idle >= timeout => return Poll::Ready(()),
                (Some(timeout), Some(idle)) => timeout - idle,
                (Some(timeout), None) => timeout,
            };
            if self.conn.probe_only {
                left = left.min(EVICT_CHECK);
            }
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + left);
        }
    }

    /// Resolves when the connection is to be closed.
    pub async fn idle(&mut self) {
        std::future::poll_fn(|cx| self.poll_idle(cx)).await;
    }
}

/// Something that knows the admitted connection it carries.
pub trait HasConn {
    /// The connection's admission ticket, if it was admitted through [`Admission`].
    fn conn(&self) -> Option<Arc<Conn>>;
}

/// An admitted TCP connection (the gateway's; the gRPC listener has its own wrapper,
/// `grpc::fast::connection`). The admission is held until the socket closes.
#[derive(Debug)]
pub struct AdmittedTcp {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AdmittedTcp {
    /// `stream`, admitted as `conn`.
    pub fn new(stream: TcpStream, conn: Arc<Conn>) -> Self {
        Self { stream, conn }
    }

    /// The client's address.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }
}

impl HasConn for AdmittedTcp {
    fn conn(&self) -> Option<Arc<Conn>> {
        Some(Arc::clone(&self.conn))
    }
}

impl AsyncRead for AdmittedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A response body that keeps its request active until it is done or dropped.
#[derive(Debug)]
pub struct ActiveBody<B> {
    inner: B,
    _activity: Option<Activity>,
}

impl<B> ActiveBody<B> {
    /// `inner`, keeping `activity` until it ends.
    pub fn new(inner: B, activity: Option<Activity>) -> Self {
        Self {
            inner,
            _activity: activity,
        }
    }
}

impl<B> Body for ActiveBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this._activity = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_then_refusal() {
        let admission = Admission::new(2, None, Duration::from_secs(10));
        let normal: Vec<_> = (0..2).map(|_| admission.admit().unwrap()).collect();
        assert!(normal.iter().all(|c| !c.probe_only()));
        let probes: Vec<_> = (0..PROBE_HEADROOM)
            .map(|_| admission.admit().unwrap())
            .collect();
        assert!(probes.iter().all(|c| c.probe_only()));
        // Full: the oldest idle probe-only connection makes room.
        let newest = admission.admit().expect("evicts an idle one");
        assert!(newest.probe_only());
        assert_eq!(probes[0].idle_for(), Some(Duration::MAX), "evicted");
        // Busy probe-only connections are not evicted.
        let _busy: Vec<_> = probes[1..].iter().map(Conn::enter).collect();
        let _newest_busy = newest.enter();
        assert!(admission.admit().is_none());
        assert_eq!(admission.refused(), 1);
        drop(normal);
        assert!(!admission.admit().unwrap().probe_only(), "a freed slot");
    }

    #[tokio::test]
    async fn idle_after_the_last_request() {
        let admission =
            Admission::new(0, Some(Duration::from_millis(200)), Duration::from_secs(10));
        let conn = admission.admit().unwrap();
        let mut watch = conn.idle_watch().unwrap();
        let active = conn.enter();
        let started = Instant::now();
        let busy = tokio::time::timeout(Duration::from_millis(400), watch.idle()).await;
        assert!(busy.is_err(), "an active connection is not idle");
        drop(active);
        watch.idle().await;
        assert!(started.elapsed() >= Duration::from_millis(600));
    }

    #[tokio::test]
    async fn a_connection_without_a_first_request_is_closed_sooner() {
        let admission =
            Admission::new(0, Some(Duration::from_secs(60)), Duration::from_millis(200));
        let silent = admission.admit().unwrap();
        let started = Instant::now();
        silent.idle_watch().unwrap().idle().await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let used = admission.admit().unwrap();
        let mut watch = used.idle_watch().unwrap();
        drop(used.enter());
        let idle = tokio::time::timeout(Duration::from_millis(600), watch.idle()).await;
        assert!(
            idle.is_err(),
            "after a request, CONNECTION_IDLE_TIMEOUT applies"
        );
    }
}
