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

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

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
    /// How long the lingering close reads at most.
    linger: Duration,
    /// Held until the lingering close is over.
    lingering: mpsc::Sender<()>,
}

impl LingeringStream {
    fn socket(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        // Outside a runtime (never, in practice) the socket simply closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(stream, self.linger, self.lingering.clone()));
        }
    }
}

/// Sends FIN after what was written, then discards what the peer still sends until it
/// closes its side, fails, or `limit` passes.
async fn linger(mut stream: TcpStream, limit: Duration, _lingering: mpsc::Sender<()>) {
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.socket()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.socket()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.socket()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.socket()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.socket()?).poll_shutdown(cx)
    }
}
