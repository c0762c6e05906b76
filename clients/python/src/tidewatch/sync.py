"""The synchronous client, for scripts and notebooks: the same calls as the asyncio
``tidewatch.Client`` (ingest sessions, ``ingest``, ``analyze``, ``watch_anomalies``,
``health``) without ``await``.

>>> with tidewatch.sync.connect("127.0.0.1:50051") as client:
...     for verdict in client.ingest(samples):
...         print(verdict.anomaly)

Each client runs the asyncio client on an event loop of its own, in a daemon thread
started on the first call (creating a client starts nothing). So the reconnecting,
exactly-once ingest session is the same code in both clients, and the client works
where an event loop already runs in the calling thread (Jupyter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from . import client as aio
from .errors import TidewatchError
from .v1 import telemetry_pb2 as pb

__all__ = ["AnomalyWatch", "Client", "IngestSession", "connect"]

T = TypeVar("T")


def connect(target: str, **options: Any) -> Client:
    """A synchronous client for the server at ``target`` (``host:port``); see ``Client``.

    Nothing connects until the first call; use it as
    ``with tidewatch.sync.connect("127.0.0.1:50051") as client: ...``.
    """
    return Client(target, **options)


class _Loop:
    """An event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``make()`` (a coroutine built on the loop's thread) and wait for it."""
        loop = self._start()

        async def call() -> T:
            return await make()

        future: Future[T] = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(timeout)
        except BaseException:
            # Interrupted (Ctrl-C) or timed out: do not leave the call running.
            future.cancel()
            raise

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="tidewatch-sync", daemon=True
                )
                self._thread.start()
            return self._loop

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _iterate(loop: _Loop, iterator: AsyncIterator[T]) -> Iterator[T]:
    """A blocking iterator over an async iterator that lives on ``loop``."""

    async def step() -> tuple[bool, T | None]:
        try:
            return True, await iterator.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        more, item = loop.run(step)
        if not more:
            return
        yield item  # type: ignore[misc]


class Client:
    """A synchronous connection to one tidewatch server.

    Takes the options of ``tidewatch.Client`` (``credentials`` for TLS, ``token``,
    ``reconnect_backoff``, ``channel_options``); a callable ``token`` runs on the
    client's own thread, so it must be thread-safe. The constructor only stores them: the
    channel is made on the first call, or by ``connect()``. ``close`` (or leaving a
    ``with`` block) closes the channel and stops the client's thread.
    """

    def __init__(self, target: str, **options: Any) -> None:
        self.target = target
        self._options = options
        self._loop = _Loop()
        self._client: aio.Client | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, timeout: float | None = None) -> Client:
        """Make the channel now and wait until it is connected (``UnavailableError``
        after ``timeout`` seconds); returns the client."""
        self.wait_ready(timeout)
        return self

    def _aio(self) -> aio.Client:
        if self._client is None:
            # Made on the loop's thread: a grpc.aio channel belongs to one loop.
            async def make() -> aio.Client:
                return aio.Client(self.target, **self._options)

            self._client = self._loop.run(make)
        return self._client

    def close(self) -> None:
        """Close the channel (calls still running end with ``CANCELLED``) and stop the
        client's thread."""
        if self._client is not None:
            client, self._client = self._client, None
            self._loop.run(client.close)
        self._loop.stop()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; ``UnavailableError`` after ``timeout`` s."""
        client = self._aio()
        self._loop.run(lambda: client.wait_ready(timeout))

    def health(self, service: str = "", *, timeout: float | None = 10.0) -> str:
        """The grpc.health.v1 status of ``service``: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        client = self._aio()
        return self._loop.run(lambda: client.health(service, timeout=timeout))

    def analyze(self, device_id: str = "", *, timeout: float | None = 10.0) -> pb.AnalyzeResponse:
        """The current window statistics of one device; ``NotFoundError`` if unknown."""
        client = self._aio()
        return self._loop.run(lambda: client.analyze(device_id, timeout=timeout))

    def delete_device(
        self, device_id: str = "", *, timeout: float | None = 10.0
    ) -> pb.DeleteDeviceResponse:
        """Delete one device's state on every replica and in Redis (``admin`` scope)."""
        client = self._aio()
        return self._loop.run(lambda: client.delete_device(device_id, timeout=timeout))

    def watch_anomalies(
        self, device_ids: Iterable[str] = (), metrics: Iterable[str] = ()
    ) -> AnomalyWatch:
        """The live feed of anomalous verdicts (empty filters mean all): iterate it with
        ``for``; ``watch.ready()`` returns once the server has subscribed it."""
        client = self._aio()
        devices, names = list(device_ids), list(metrics)

        async def make() -> aio.AnomalyWatch:
            return client.watch_anomalies(devices, names)

        return AnomalyWatch(self._loop, self._loop.run(make))

    def session(self, **options: Any) -> IngestSession:
        """An ingest session: ``send`` samples, iterate verdicts, ``close`` when done.

        Takes the options of ``tidewatch.Client.session`` (``detector``, ``batch_size``,
        ``linger``, ``max_in_flight``, ``assign_seq``, ``backoff``) and behaves the same:
        batched, re-sent after a broken stream, one verdict per sample in order.
        """
        client = self._aio()

        async def make() -> aio.IngestSession:
            return client.session(**options)

        return IngestSession(self._loop, self._loop.run(make))

    def ingest(self, samples: Iterable[pb.Sample], **session_options: Any) -> Iterator[pb.Verdict]:
        """Stream ``samples`` and yield one verdict per sample, in order.

        Takes the options of ``session``. ``samples`` is read on a thread of its own, so
        a slow source (a sensor, a generator that sleeps) and the verdicts interleave.
        Raises the session's error if it fails.
        """
        session = self.session(**session_options)
        failure: list[BaseException] = []

        def feed() -> None:
            try:
                for sample in samples:
                    session.send(sample)
                session.close()
            except BaseException as error:  # noqa: BLE001 - re-raised by the iteration
                failure.append(error)
                session.abort()

        feeder = threading.Thread(target=feed, name="tidewatch-sync-feed", daemon=True)
        feeder.start()
        try:
            yield from session
        finally:
            if feeder.is_alive():
                session.abort()
            feeder.join()
        if failure and not isinstance(failure[0], TidewatchError):
            raise failure[0]


class AnomalyWatch:
    """A running ``WatchAnomalies`` call: an iterator of ``WatchAnomaliesResponse``.

    Ends with ``UnavailableError`` when the server shuts down; ``cancel`` (or leaving a
    ``with`` block) stops it, and an iteration blocked in another thread then ends.
    """

    def __init__(self, loop: _Loop, watch: aio.AnomalyWatch) -> None:
        self._loop = loop
        self._watch = watch
        self._cancelled = False

    def ready(self, timeout: float | None = 10.0) -> None:
        """Return once the server has subscribed this watcher."""
        self._loop.run(self._watch.ready, timeout)

    def cancel(self) -> None:
        """Stop watching."""

        async def cancel() -> None:
            self._watch.cancel()

        self._cancelled = True
        self._loop.run(cancel)

    def __enter__(self) -> AnomalyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __iter__(self) -> Iterator[pb.WatchAnomaliesResponse]:
        return self._events()

    def _events(self) -> Iterator[pb.WatchAnomaliesResponse]:
        try:
            yield from _iterate(self._loop, self._watch.__aiter__())
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            # A cancelled call may end its pending read by cancellation: that is the end.
            if not self._cancelled:
                raise


class IngestSession:
    """One logical Ingest stream that survives broken connections (the asyncio
    ``IngestSession`` behind a blocking interface): ``send`` samples from one thread,
    iterate the verdicts (in send order, exactly once) from the same thread after
    ``close``, or from another thread meanwhile."""

    def __init__(self, loop: _Loop, session: aio.IngestSession) -> None:
        self._loop = loop
        self._session = session

    @property
    def streams_opened(self) -> int:
        """Streams opened so far (1 + reconnects)."""
        return self._session.streams_opened

    @property
    def resent(self) -> int:
        """Samples re-sent because their stream broke before answering them."""
        return self._session.resent

    def send(self, sample: pb.Sample) -> None:
        """Queue one sample; blocks while ``max_in_flight`` messages are unanswered."""
        self._loop.run(lambda: self._session.send(sample))

    def flush(self) -> None:
        """Put the buffered samples into a message now."""
        self._loop.run(self._session.flush)

    def close(self) -> None:
        """Send what is buffered and wait for every verdict; raises the session's error."""
        self._loop.run(self._session.close)

    def abort(self) -> None:
        """Stop at once; unanswered samples get no verdict."""
        self._loop.run(self._session.abort)

    def __enter__(self) -> IngestSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __iter__(self) -> Iterator[pb.Verdict]:
        return _iterate(self._loop, self._session.__aiter__())
