//! Accepted gRPC connections, closed without losing what the peer has not read yet.
//!
//! When the server ends a connection (shutdown, `MAX_CONNECTION_AGE`) while a client
//! is still streaming requests, the socket has unread data in its receive buffer;
//! closing such a socket makes the kernel send a TCP reset, and a reset throws away
//! whatever the client had not read yet: the last verdicts and the `UNAVAILABLE`
//! status of its stream. So a closed connection first sends FIN after everything it
//! wrote, then keeps reading (and discarding) until the peer closes its side or the
//! linger time is up (a "lingering close", as web servers do). `Server::serve` waits
//! for lingering connections as part of its drain.
//!
//! It also sets `TCP_NODELAY`, which tonic's builder setting does not do for an
//! incoming stream the caller provides: verdicts are small and must not wait for
//! Nagle's algorithm.
//!
//! And, unless `FLUSH_CONSOLIDATION=false`, it consolidates flushes, as Netty's
//! `FlushConsolidationHandler` does. HTTP/2 flushes each time the connection task runs, and also in the middle of a run: after
//! every DATA frame of 256 bytes or more, and whenever its 16 KiB write buffer fills.
//! The task runs once per stream that has answers: a stream task that hands HTTP/2 a
//! chunk wakes the connection task, which tokio runs next (the LIFO slot), before the
//! other streams woken by the same read. Sending at every flush made that a system
//! call per stream per read, and on loopback each one also runs the peer's TCP receive
//! and wakes it. So writes of less than [`DIRECT_WRITE`] bytes are copied into a
//! buffer, and a flush only asks for a send, which happens two turns of the task later:
//! - a flush of a buffer nobody asked to send yet wakes the task, which tokio queues
//!   behind the tasks already runnable (one turn);
//! - the task's first read after that starts its next run: the flush is armed, and the
//!   task wakes itself again; what it writes in this run (the answers of the streams
//!   that ran meanwhile) joins the buffer;
//! - the first read of the run after that sends everything, with one system call.
//!
//! A run of an HTTP/2 (or HTTP/1) connection reads until a read finds nothing, then
//! writes and ends with a flush (the handshake, which reads the client's preface, ends
//! with the read): so the first read after a flush or after a read that found nothing
//! starts a new run. The buffer is also sent when it would exceed [`MAX_BUFFERED`],
//! and shutdown and the lingering close send what is buffered first.
//!
//! What this relies on from h2 and hyper, and what an upgrade must re-check, is in
//! the contract in [`super`].

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::connections::{Admission, Conn, HasConn, IdleWatch};

#[cfg(test)]
mod tests;

/// A write at least this big, with nothing buffered, skips the buffer.
const DIRECT_WRITE: usize = 8 * 1024;

/// The most bytes the buffer holds before it is sent without waiting for a flush:
/// room for the answers of many streams in one turn (a buffer of h2's 16 KiB costs
/// measurably more CPU per message with 64 busy streams).
const MAX_BUFFERED: usize = 64 * 1024;

/// What a new buffer reserves at least (it grows by doubling up to
/// [`MAX_BUFFERED`]).
const MIN_BUFFER: usize = 4 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` for tonic. Each connection holds a clone of
/// `lingering` until its lingering close is over, so the receiver learns when every
/// connection is fully closed (its `recv` returns `None`). `consolidate`
/// (`FLUSH_CONSOLIDATION`) switches flush consolidation on.
///
/// `admission` decides whether each connection is served, probe-only, or closed at
/// once (`MAX_CONNECTIONS`); an admitted connection is closed once it has been idle
/// for its timeout (see `connections`).
pub(crate) fn incoming(
    listener: TcpListener,
    linger: Duration,
    consolidate: bool,
    lingering: mpsc::Sender<()>,
    admission: Arc<Admission>,
) -> impl Stream<Item = io::Result<LingeringStream>> + Send + 'static {
    async_stream::stream! {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Some(conn) = admission.admit() else {
                        tracing::debug!(%peer, "grpc connection refused: MAX_CONNECTIONS and the probe headroom are in use");
                        drop(stream);
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    yield Ok(LingeringStream {
                        stream: Some(stream),
                        out: Outbox::default(),
                        run_ended: false,
                        consolidate,
                        linger,
                        lingering: lingering.clone(),
                        idle: conn.idle_watch(),
                        conn: Some(conn),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "grpc accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// A TCP connection whose drop is a lingering close.
#[derive(Debug)]
pub(crate) struct LingeringStream {
    /// The socket; taken by the lingering close on drop.
    stream: Option<TcpStream>,
    /// Written bytes not sent yet (see the module documentation).
    out: Outbox,
    /// The last read found nothing, or a flush came after it: the next read starts
    /// a new run of the task.
    run_ended: bool,
    /// Flush consolidation is on; off, writes and flushes go straight to the socket.
    consolidate: bool,
    /// How long the lingering close reads at most.
    linger: Duration,
    /// Held until the lingering close is over.
    lingering: mpsc::Sender<()>,
    /// The connection's admission (`MAX_CONNECTIONS`), held until its socket closes.
    conn: Option<Arc<Conn>>,
    /// Ends the connection (reads end) once it has been idle for its timeout.
    idle: Option<IdleWatch>,
}

/// Bytes written to a connection and not sent yet.
#[derive(Debug, Default)]
struct Outbox {
    /// The bytes; empty (and unallocated) when everything is sent.
    bytes: Vec<u8>,
    /// How many of `bytes` are sent already.
    sent: usize,
    /// Where the flush of these bytes stands.
    flush: Flush,
}

/// Where the send of buffered bytes stands (see the module documentation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// No flush asked for them yet.
    #[default]
    No,
    /// A flush asked for them in this run of the task, which woke itself.
    Asked,
    /// The task has run again since: its next run sends them.
    Armed,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.bytes.len() == self.sent
    }

    /// Sends every buffered byte; on `Ready(Ok)` the buffer is empty and released.
    fn poll_send(&mut self, cx: &mut Context<'_>, socket: &mut TcpStream) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            match Pin::new(&mut *socket).poll_write(cx, &self.bytes[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Released, not kept: an idle connection holds no buffer.
        *self = Self::default();
        Poll::Ready(Ok(()))
    }
}

impl LingeringStream {
    fn socket(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Sends what is buffered.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let Some(socket) = self.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        self.out.poll_send(cx, socket)
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        // Outside a runtime (never, in practice) the socket simply closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let unsent = std::mem::take(&mut self.out);
            let held = (self.lingering.clone(), self.conn.take());
            runtime.spawn(linger(stream, unsent, self.linger, held));
        }
    }
}

/// Sends what was written and not sent yet, then FIN, then discards what the peer
/// still sends until it closes its side, fails, or `limit` passes.
async fn linger(
    mut stream: TcpStream,
    unsent: Outbox,
    limit: Duration,
    _held: (mpsc::Sender<()>, Option<Arc<Conn>>),
) {
    if stream
        .write_all(&unsent.bytes[unsent.sent..])
        .await
        .is_err()
    {
        return;
    }
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut discard = [0u8; 8192];
    let _ = tokio::time::timeout(limit, async {
        while let Ok(1..) = stream.read(&mut discard).await {}
    })
    .await;
}

impl Connected for LingeringStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        TcpConnectInfo {
            local_addr: self.stream.as_ref().and_then(|s| s.local_addr().ok()),
            remote_addr: self.stream.as_ref().and_then(|s| s.peer_addr().ok()),
        }
    }
}

impl HasConn for LingeringStream {
    fn conn(&self) -> Option<Arc<Conn>> {
        self.conn.clone()
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.run_ended) {
            match this.out.flush {
                Flush::No => {}
                Flush::Asked => {
                    this.out.flush = Flush::Armed;
                    cx.waker().wake_by_ref();
                }
                Flush::Armed => {
                    // A full socket keeps the rest: its write readiness wakes the
                    // task, and the next run tries again. Reading goes on meanwhile.
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        let read = Pin::new(this.socket()?).poll_read(cx, buf);
        this.run_ended = read.is_pending();
        if read.is_pending()
            && let Some(idle) = this.idle.as_mut()
            && idle.poll_idle(cx).is_ready()
        {
            // Idle for CONNECTION_IDLE_TIMEOUT: the end of input closes it.
            this.idle = None;
            tracing::debug!("grpc connection idle: closing");
            return Poll::Ready(Ok(()));
        }
        read
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.consolidate {
            return Pin::new(this.socket()?).poll_write_vectored(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.out.bytes.len() + len > MAX_BUFFERED {
            ready!(this.poll_send(cx))?;
        }
        if len >= DIRECT_WRITE && this.out.is_empty() {
            return Pin::new(this.socket()?).poll_write_vectored(cx, bufs);
        }
        this.socket()?;
        if this.out.bytes.capacity() == 0 {
            this.out.bytes.reserve(len.max(MIN_BUFFER));
        }
        for buf in bufs {
            this.out.bytes.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.consolidate {
            return Pin::new(this.socket()?).poll_flush(cx);
        }
        this.run_ended = true;
        // Sent two runs later (see the module documentation), never here.
        if !this.out.is_empty() && this.out.flush == Flush::No {
            this.out.flush = Flush::Asked;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(this.socket()?).poll_shutdown(cx)
    }
}
