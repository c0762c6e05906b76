//! Unit tests of the connection wrapper, over real loopback sockets.

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

/// A connected pair: the server side wrapped as `incoming` wraps it (with flush
/// consolidation), and the peer; the receiver learns when the lingering close is over.
async fn pair() -> (LingeringStream, TcpStream, mpsc::Receiver<()>) {
    pair_with(true).await
}

async fn pair_with(consolidate: bool) -> (LingeringStream, TcpStream, mpsc::Receiver<()>) {
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
        consolidate,
        linger: Duration::from_secs(5),
        lingering: tx,
        conn: None,
        idle: None,
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

#[tokio::test]
async fn without_consolidation_every_write_goes_straight_out() {
    let (mut stream, mut peer, mut rx) = pair_with(false).await;
    let wakes = Arc::new(Wakes::default());
    let waker: Waker = futures::task::waker(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    read_nothing(&mut stream, &mut cx);
    assert_eq!(write(&mut stream, &mut cx, b"first "), 6);
    assert_eq!(
        available(&mut peer).await,
        b"first ",
        "sent before any flush"
    );
    flush(&mut stream, &mut cx);
    read_nothing(&mut stream, &mut cx);
    assert_eq!(write(&mut stream, &mut cx, b"second"), 6);
    assert_eq!(available(&mut peer).await, b"second");
    assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "no self-wakes");
    assert_eq!(stream.out.bytes.capacity(), 0, "nothing buffered");
    drop(stream);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).await.expect("read to FIN");
    assert!(rest.is_empty());
    drop(peer);
    assert!(rx.recv().await.is_none(), "the lingering close ended");
}
