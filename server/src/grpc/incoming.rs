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
//! And it consolidates flushes, as Netty's `FlushConsolidationHandler` does. HTTP/2
//! flushes each time the connection task runs, and also in the middle of a run: after
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

use std::{
    io,
    pin::Pin,
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

/// A write at least this big, with nothing buffered, skips the buffer.
const DIRECT_WRITE: usize = 8 * 1024;

/// The most bytes the buffer holds before it is sent without waiting for a flush.
/// With 16 KiB the suite's (b) (64 streams, 4.5 KB answers) took 5 % more server CPU
/// per message than with 64 KiB.
const MAX_BUFFERED: usize = 64 * 1024;

/// What a new buffer reserves at least (it grows by doubling up to
/// [`MAX_BUFFERED`]).
const MIN_BUFFER: usize = 4 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` for tonic. Each connection holds a clone of
/// `lingering` until its lingering close is over, so the receiver learns when every
/// connection is fully closed (its `recv` returns `None`).
pub(crate) fn incoming(
    listener: TcpListener,
    linger: Duration,
    lingering: mpsc::Sender<()>,
) -> impl Stream<Item = io::Result<LingeringStream>> + Send + 'static {
    async_stream::stream! {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    yield Ok(LingeringStream {
                        stream: Some(stream),
                        out: Outbox::default(),
                        run_ended: false,
                        linger,
                        lingering: lingering.clone(),
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
    /// How long the lingering close reads at most.
    linger: Duration,
    /// Held until the lingering close is over.
    lingering: mpsc::Sender<()>,
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
            runtime.spawn(linger(stream, unsent, self.linger, self.lingering.clone()));
        }
    }
}

/// Sends what was written and not sent yet, then FIN, then discards what the peer
/// still sends until it closes its side, fails, or `limit` passes.
async fn linger(
    mut stream: TcpStream,
    unsent: Outbox,
    limit: Duration,
    _lingering: mpsc::Sender<()>,
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

#[cfg(test)]
mod tests {
    use std::{
        future::poll_fn,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Waker,
    };

    use futures::task::ArcWake;

    use super::*;

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connected pair: the server side wrapped as `incoming` wraps it, and the peer;
    /// the receiver learns when the lingering close is over.
    async fn pair() -> (LingeringStream, TcpStream, mpsc::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(1);
        let (stream, _) = listener.accept().await.expect("accept");
        let wrapped = LingeringStream {
            stream: Some(stream),
            out: Outbox::default(),
            run_ended: false,
            linger: Duration::from_secs(5),
            lingering: tx,
        };
        (wrapped, peer, rx)
    }

    /// What the peer can read now, without waiting for more.
    async fn available(peer: &mut TcpStream) -> Vec<u8> {
        // Loopback delivers within the write call; a short pause covers scheduling.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match peer.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    }

    fn write(stream: &mut LingeringStream, cx: &mut Context<'_>, bytes: &[u8]) -> usize {
        match Pin::new(stream).poll_write(cx, bytes) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("write: {other:?}"),
        }
    }

    fn flush(stream: &mut LingeringStream, cx: &mut Context<'_>) {
        match Pin::new(stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            other => panic!("flush: {other:?}"),
        }
    }

    /// A read that finds nothing (the peer sends nothing in these tests): as each
    /// run of the connection task starts.
    fn read_nothing(stream: &mut LingeringStream, cx: &mut Context<'_>) {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Pending => {}
            other => panic!("read: {other:?}"),
        }
    }

    /// What the peer sent, read as a run of the connection task reads it (the
    /// socket is readable: the read finds data).
    fn read_some(stream: &mut LingeringStream, cx: &mut Context<'_>) -> Vec<u8> {
        let mut bytes = [0u8; 64];
        let mut buf = ReadBuf::new(&mut bytes);
        match Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => buf.filled().to_vec(),
            other => panic!("read: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_flush_is_sent_two_runs_later_with_everything_written_meanwhile() {
        let (mut stream, mut peer, _rx) = pair().await;
        let wakes = Arc::new(Wakes::default());
        let waker: Waker = futures::task::waker(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let wakes = || wakes.0.load(Ordering::SeqCst);

        // Run 1: a write and the flush that ends the run.
        read_nothing(&mut stream, &mut cx);
        assert_eq!(write(&mut stream, &mut cx, b"first "), 6);
        flush(&mut stream, &mut cx);
        assert_eq!(wakes(), 1, "the task is queued again");
        assert!(available(&mut peer).await.is_empty(), "held");

        // Run 2: its first read arms the flush; it reads until a read finds nothing,
        // and what it writes (even a big write, flushed in the middle of the run)
        // joins the buffer.
        peer.write_all(b"request").await.expect("peer writes");
        let socket = stream.stream.as_ref().expect("open");
        socket.readable().await.expect("readable");
        // The data's arrival woke the task (the first read registered it).
        let before = wakes();
        assert_eq!(read_some(&mut stream, &mut cx), b"request");
        assert_eq!(wakes(), before + 1, "armed, and queued again");
        read_nothing(&mut stream, &mut cx);
        let big = vec![b'x'; DIRECT_WRITE];
        assert_eq!(write(&mut stream, &mut cx, b"second "), 7);
        flush(&mut stream, &mut cx);
        assert_eq!(write(&mut stream, &mut cx, &big), big.len());
        flush(&mut stream, &mut cx);
        assert_eq!(wakes(), before + 1, "no more wakes for the same bytes");
        assert!(available(&mut peer).await.is_empty());

        // Run 3: its first read sends everything, in order, with one send.
        read_nothing(&mut stream, &mut cx);
        let mut expected = b"first second ".to_vec();
        expected.extend_from_slice(&big);
        assert_eq!(available(&mut peer).await, expected);
        assert_eq!(
            stream.out.bytes.capacity(),
            0,
            "an idle connection holds no buffer"
        );
        flush(&mut stream, &mut cx);
        read_nothing(&mut stream, &mut cx);
        assert_eq!(wakes(), before + 1, "nothing to send, no wake");

        // A new buffer starts over.
        write(&mut stream, &mut cx, b"third");
        flush(&mut stream, &mut cx);
        assert_eq!(wakes(), before + 2);
        read_nothing(&mut stream, &mut cx);
        flush(&mut stream, &mut cx);
        assert!(available(&mut peer).await.is_empty());
        read_nothing(&mut stream, &mut cx);
        assert_eq!(available(&mut peer).await, b"third");
    }

    #[tokio::test]
    async fn runs_that_end_with_a_read_send_too() {
        // As the HTTP/2 handshake does: write the server's settings, flush, then read
        // the client's preface, which the client may send only once it has them.
        let (mut stream, mut peer, _rx) = pair().await;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        write(&mut stream, &mut cx, b"settings");
        flush(&mut stream, &mut cx);
        read_nothing(&mut stream, &mut cx);
        assert!(available(&mut peer).await.is_empty());
        read_nothing(&mut stream, &mut cx);
        assert_eq!(available(&mut peer).await, b"settings");
    }

    #[tokio::test]
    async fn a_big_write_with_nothing_buffered_goes_straight_out() {
        let (mut stream, mut peer, _rx) = pair().await;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let big = vec![b'y'; DIRECT_WRITE];
        let n = write(&mut stream, &mut cx, &big);
        assert!(n > 0);
        assert_eq!(available(&mut peer).await, &big[..n], "no flush needed");
        assert!(stream.out.is_empty());
    }

    #[tokio::test]
    async fn a_full_buffer_is_sent_before_more_is_taken() {
        let (mut stream, mut peer, _rx) = pair().await;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let chunk = vec![b'z'; DIRECT_WRITE - 1];
        let mut written = 0;
        while written + chunk.len() <= MAX_BUFFERED {
            written += write(&mut stream, &mut cx, &chunk);
        }
        assert!(available(&mut peer).await.is_empty());
        let tail = vec![b't'; MAX_BUFFERED - written + 1];
        write(&mut stream, &mut cx, &tail);
        let got = available(&mut peer).await;
        assert_eq!(
            got.len(),
            written,
            "the buffer went out before the tail joined it"
        );
        for _ in 0..2 {
            flush(&mut stream, &mut cx);
            read_nothing(&mut stream, &mut cx);
        }
        assert_eq!(available(&mut peer).await, tail);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_buffered_before_fin() {
        let (mut stream, mut peer, _rx) = pair().await;
        poll_fn(|cx| {
            assert_eq!(write(&mut stream, cx, b"last words"), 10);
            Poll::Ready(())
        })
        .await;
        stream.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read to FIN");
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn the_lingering_close_sends_what_is_buffered_before_fin() {
        let (mut stream, mut peer, mut rx) = pair().await;
        poll_fn(|cx| {
            assert_eq!(write(&mut stream, cx, b"unsent"), 6);
            flush(&mut stream, cx);
            Poll::Ready(())
        })
        .await;
        drop(stream);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read to FIN");
        assert_eq!(got, b"unsent");
        drop(peer);
        assert!(rx.recv().await.is_none(), "the lingering close ended");
    }
}
