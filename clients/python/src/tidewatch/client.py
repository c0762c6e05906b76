"""The asyncio client: a channel to one tidewatch server and its calls.

``Client`` wraps the generated ``TelemetryServiceStub``: ``analyze``, ``watch_anomalies``,
``health``, and ingest sessions (``session`` for a long-lived producer, ``ingest`` to turn
an iterable of samples into an async iterator of verdicts).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .auth import Token, token_interceptors
from .backoff import Backoff
from .errors import (
    ProtocolError,
    SessionClosedError,
    TidewatchError,
    UnavailableError,
    from_rpc_error,
    from_status,
)
from .v1 import telemetry_pb2 as pb
from .v1 import telemetry_pb2_grpc as pb_grpc

__all__ = ["Client", "connect", "IngestSession", "AnomalyWatch"]

#: The device the server uses for samples without one.
DEFAULT_DEVICE = "default"

# The reason a server gives for a sample whose device another replica holds
# (docs/architecture.md, "Ownership"): nothing was applied; the session sends it again.
MOVED = "moved:"

# Seconds a sample answered ``moved`` waits before it is sent again.
MOVED_RETRY = 0.05


def connect(target: str, **options: Any) -> Client:
    """A client for the server at ``target`` (``host:port``); see ``Client``.

    Use it as ``async with tidewatch.connect("127.0.0.1:50051") as client: ...``.
    """
    return Client(target, **options)


class Client:
    """A connection to one tidewatch server.

    ``target`` is ``host:port``. ``credentials`` makes a TLS channel (plaintext without):
    ``tidewatch.tls(ca=..., cert=..., key=...)`` builds them. ``token`` is sent as
    ``authorization: Bearer <token>`` on every call: a string, or a callable (plain or
    ``async``) called when each call opens, for a token that is refreshed.
    ``reconnect_backoff`` also bounds how fast the channel itself re-dials a lost server.
    The constructor starts nothing: the channel is made by the first call and connects
    in the background; ``wait_ready`` waits for it.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: Token | None = None,
        reconnect_backoff: Backoff | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        backoff = reconnect_backoff or Backoff()
        # grpc's own re-dial backoff starts at 1 s; align it with the session's so a
        # restarted server is found again as soon as the session retries.
        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff.initial * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, int(backoff.initial * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(backoff.max * 1000))),
            *channel_options,
        ]
        self._credentials = credentials
        self._interceptors = [] if token is None else token_interceptors(token)
        self._channel_options = options
        self.target = target
        self._backoff = backoff
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.TelemetryServiceStub | None = None
        self._health_: health_pb2_grpc.HealthStub | None = None

    def _connect(self) -> grpc.aio.Channel:
        # The channel is made on first use (in the running event loop), never by the
        # constructor; gRPC then dials in the background.
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target,
                    options=self._channel_options,
                    interceptors=self._interceptors,
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target,
                    self._credentials,
                    options=self._channel_options,
                    interceptors=self._interceptors,
                )
            self._stub_ = pb_grpc.TelemetryServiceStub(self._channel)
            self._health_ = health_pb2_grpc.HealthStub(self._channel)
        return self._channel

    @property
    def _stub(self) -> pb_grpc.TelemetryServiceStub:
        self._connect()
        assert self._stub_ is not None
        return self._stub_

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        self._connect()
        assert self._health_ is not None
        return self._health_

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running end with ``CANCELLED``."""
        if self._channel is not None:
            await self._channel.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; ``UnavailableError`` after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._connect().channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(
                f"no connection to {self.target} within {timeout}s",
                grpc.StatusCode.UNAVAILABLE,
            ) from None

    async def health(self, service: str = "", *, timeout: float | None = 10.0) -> str:
        """The grpc.health.v1 status of ``service`` ("" is the whole server, or
        ``"tidewatch.v1.TelemetryService"``): ``"SERVING"``, ``"NOT_SERVING"``, ...

        ``NotFoundError`` for a service the server does not know.
        """
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def analyze(
        self, device_id: str = "", *, timeout: float | None = 10.0
    ) -> pb.AnalyzeResponse:
        """The current window statistics of one device; ``NotFoundError`` if unknown."""
        try:
            return await self._stub.Analyze(
                pb.AnalyzeRequest(device_id=device_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def delete_device(
        self, device_id: str = "", *, timeout: float | None = 10.0
    ) -> pb.DeleteDeviceResponse:
        """Delete one device's state from the memory of every replica and from Redis;
        its next sample starts fresh. ``deleted`` in the answer says whether it had
        any. Needs the ``admin`` scope when the server authenticates
        (``PermissionDeniedError``); ``UnavailableError`` means nothing was deleted."""
        try:
            return await self._stub.DeleteDevice(
                pb.DeleteDeviceRequest(device_id=device_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    def watch_anomalies(
        self, device_ids: Iterable[str] = (), metrics: Iterable[str] = ()
    ) -> AnomalyWatch:
        """The live feed of anomalous verdicts, filtered by devices and metrics (empty
        means all). Iterate it with ``async for``; ``await watch.ready()`` returns once
        the server has subscribed it, so no later anomaly is missed."""
        request = pb.WatchAnomaliesRequest(device_ids=list(device_ids), metrics=list(metrics))
        return AnomalyWatch(self._stub.WatchAnomalies(request))

    def session(
        self,
        *,
        detector: pb.DetectorConfig | None = None,
        batch_size: int = 100,
        linger: float = 0.005,
        max_in_flight: int = 64,
        assign_seq: bool = True,
        backoff: Backoff | None = None,
    ) -> IngestSession:
        """An ingest session: ``send`` samples, iterate verdicts, ``close`` when done.

        Samples are batched (at most ``batch_size`` per message, or whatever arrived
        within ``linger`` seconds); at most ``max_in_flight`` messages wait for their
        answer before ``send`` waits. A broken stream is re-opened with ``backoff`` and
        its unanswered samples are re-sent; ``assign_seq`` numbers samples without a
        ``seq`` per device so such a re-send is never applied twice.
        """
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        return IngestSession(
            self._stub,
            detector=detector,
            batch_size=batch_size,
            linger=linger,
            max_in_flight=max_in_flight,
            assign_seq=assign_seq,
            backoff=backoff or self._backoff,
        )

    async def ingest(
        self,
        samples: Iterable[pb.Sample] | AsyncIterable[pb.Sample],
        **session_options: Any,
    ) -> AsyncIterator[pb.Verdict]:
        """Stream ``samples`` and yield one verdict per sample, in order.

        Takes the options of ``session``. Raises the session's error if it fails.
        """
        session = self.session(**session_options)

        async def feed() -> None:
            try:
                if isinstance(samples, AsyncIterable):
                    async for sample in samples:
                        await session.send(sample)
                else:
                    for sample in samples:
                        await session.send(sample)
                await session.close()
            except BaseException:
                # The iteration then ends, and awaiting the feeder raises this.
                await session.abort()
                raise

        feeder = asyncio.create_task(feed())
        try:
            async for verdict in session:
                yield verdict
            await feeder
        finally:
            if not feeder.done():
                feeder.cancel()
            await session.abort()
            if feeder.done() and not feeder.cancelled():
                feeder.exception()  # retrieved: the session's error was raised instead


class AnomalyWatch:
    """A running ``WatchAnomalies`` call: an async iterator of
    ``WatchAnomaliesResponse`` (each holding a verdict and how many events were missed).
    Ends with ``UnavailableError`` when the server shuts down. ``cancel`` stops it."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def ready(self) -> None:
        """Return once the server has subscribed this watcher."""
        try:
            await self._call.initial_metadata()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        if self._call.done():
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                raise from_status(code, await self._call.details() or "")

    def cancel(self) -> None:
        """Stop watching."""
        self._call.cancel()

    async def __aenter__(self) -> AnomalyWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __aiter__(self) -> AsyncIterator[pb.WatchAnomaliesResponse]:
        return self._events()

    async def _events(self) -> AsyncIterator[pb.WatchAnomaliesResponse]:
        try:
            async for event in self._call:
                yield event
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise from_rpc_error(error) from None


class _End:
    """Marks the end of a session's verdicts."""


class IngestSession:
    """One logical Ingest stream that survives broken connections.

    ``send`` queues a sample; ``async for verdict in session`` yields one ``Verdict``
    per sample in the order they were sent, exactly once, across reconnects. ``close``
    sends what is buffered, waits for every answer and ends the iteration. Use it as an
    async context manager to close it on exit (or abort it on an exception).
    """

    def __init__(
        self,
        stub: pb_grpc.TelemetryServiceStub,
        *,
        detector: pb.DetectorConfig | None,
        batch_size: int,
        linger: float,
        max_in_flight: int,
        assign_seq: bool,
        backoff: Backoff,
    ) -> None:
        self._stub = stub
        self._detector = detector
        self._batch_size = batch_size
        self._linger = linger
        self._max_in_flight = max_in_flight
        self._assign_seq = assign_seq
        self._backoff = backoff
        # Samples not yet in a message.
        self._buffer: list[pb.Sample] = []
        self._linger_timer: asyncio.TimerHandle | None = None
        # Messages not yet written to the current stream, oldest first.
        self._unsent: deque[list[pb.Sample]] = deque()
        # Messages written to the current stream and not yet answered, oldest first.
        self._pending: deque[list[pb.Sample]] = deque()
        # Wakes the writer (new message, close) and senders waiting for room.
        self._changed = asyncio.Condition()
        self._verdicts: asyncio.Queue[pb.Verdict | _End | TidewatchError] = asyncio.Queue()
        self._last_seq: dict[str, int] = {}
        self._closing = False
        self._aborted = False
        self._error: TidewatchError | None = None
        # Samples answered ``moved``, waiting to be sent again.
        self._moved = 0
        #: Streams opened so far (1 + reconnects); for observability and tests.
        self.streams_opened = 0
        #: Samples re-sent because their stream broke before answering them.
        self.resent = 0
        # Started by the first send, close or iteration: constructing starts nothing.
        self._driver: asyncio.Task[None] | None = None

    def _start(self) -> asyncio.Task[None]:
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive())
        return self._driver

    async def __aenter__(self) -> IngestSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    def __aiter__(self) -> AsyncIterator[pb.Verdict]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[pb.Verdict]:
        self._start()
        while True:
            item = await self._verdicts.get()
            if isinstance(item, _End):
                self._verdicts.put_nowait(item)
                return
            if isinstance(item, TidewatchError):
                self._verdicts.put_nowait(item)
                raise item
            yield item

    async def send(self, sample: pb.Sample) -> None:
        """Queue one sample; waits while ``max_in_flight`` messages are unanswered.

        The sample is copied; without a ``seq`` (and with ``assign_seq``) it gets the
        next one of its device: at least one more than the last, and at least the
        current time in microseconds, so a new session's samples are never taken for
        duplicates of an earlier session's.
        """
        if self._error is not None:
            raise self._error
        if self._closing:
            raise SessionClosedError("the ingest session is closed")
        self._start()
        copy = pb.Sample()
        copy.CopyFrom(sample)
        device = copy.device_id or DEFAULT_DEVICE
        if copy.seq == 0 and self._assign_seq:
            copy.seq = max(self._last_seq.get(device, 0) + 1, time.time_ns() // 1000)
        if copy.seq:
            self._last_seq[device] = max(self._last_seq.get(device, 0), copy.seq)
        self._buffer.append(copy)
        if len(self._buffer) >= self._batch_size:
            await self.flush()
        elif self._linger_timer is None:
            loop = asyncio.get_running_loop()
            self._linger_timer = loop.call_later(
                self._linger, lambda: asyncio.ensure_future(self._linger_flush())
            )

    async def _linger_flush(self) -> None:
        self._linger_timer = None
        try:
            await self.flush()
        except TidewatchError:
            pass  # the session failed: the iteration and the next send report it

    async def flush(self) -> None:
        """Put the buffered samples into a message now; waits for room in flight."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        async with self._changed:
            # Room is judged before queueing, so one message always gets through.
            await self._changed.wait_for(
                lambda: self._error is not None
                or self._aborted
                or len(self._unsent) + len(self._pending) < self._max_in_flight
            )
            if self._error is None and not self._aborted:
                self._unsent.append(batch)
                self._changed.notify_all()
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise SessionClosedError("the ingest session was aborted")

    async def close(self) -> None:
        """Send what is buffered, wait for every verdict, end the iteration.

        Raises the session's error if it failed.
        """
        if not self._closing and self._error is None:
            await self.flush()
            async with self._changed:
                self._closing = True
                self._changed.notify_all()
        driver = self._start()
        try:
            await asyncio.shield(driver)
        except asyncio.CancelledError:
            if not driver.cancelled():
                raise
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop at once; unanswered samples get no verdict, waiting senders get
        ``SessionClosedError``."""
        self._closing = True
        self._aborted = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
        async with self._changed:
            self._changed.notify_all()
        self._verdicts.put_nowait(_End())

    def _finished(self) -> bool:
        return (
            self._closing
            and not self._unsent
            and not self._pending
            and not self._buffer
            and not self._moved
        )

    async def _send_again(self, samples: list[pb.Sample]) -> None:
        """Queue samples answered ``moved`` again after ``MOVED_RETRY`` seconds."""
        await asyncio.sleep(MOVED_RETRY)
        async with self._changed:
            self._moved -= len(samples)
            self._unsent.append(samples)
            self._changed.notify_all()

    async def _drive(self) -> None:
        """Open streams until every message is answered; reconnect on retryable errors."""
        attempt = 0
        try:
            while True:
                # Open a stream only when there is something to send.
                async with self._changed:
                    await self._changed.wait_for(lambda: self._unsent or self._closing)
                    if self._finished():
                        break
                call = self._stub.Ingest()
                self.streams_opened += 1
                writer = asyncio.create_task(self._write(call))
                try:
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            break
                        if not self._pending:
                            raise ProtocolError("a response arrived for no request")
                        batch = self._pending.popleft()
                        if len(response.verdicts) != len(batch):
                            raise ProtocolError(
                                f"{len(response.verdicts)} verdicts for {len(batch)} samples"
                            )
                        attempt = 0
                        moved = []
                        for sample, verdict in zip(batch, response.verdicts):
                            if verdict.error.startswith(MOVED):
                                # Nothing was applied: the device is moving between
                                # replicas of the server. Sent again shortly, in order.
                                moved.append(sample)
                            else:
                                self._verdicts.put_nowait(verdict)
                        if moved:
                            self._moved += len(moved)
                            asyncio.create_task(self._send_again(moved))
                        async with self._changed:
                            self._changed.notify_all()
                    if self._finished():
                        await writer
                        break
                    # The server ended the stream without an error and without answering
                    # everything: re-send the rest on a new stream, as after an error.
                    failure: TidewatchError = UnavailableError(
                        "the server ended the stream early", grpc.StatusCode.UNAVAILABLE
                    )
                except grpc.aio.AioRpcError as error:
                    failure = from_rpc_error(error)
                    if not failure.retryable:
                        raise failure from None
                finally:
                    if not writer.done():
                        writer.cancel()
                    # `wait` does not raise the writer's outcome (a broken stream fails
                    # its writes too; the read side reports it) but does propagate a
                    # cancellation of this task.
                    await asyncio.wait([writer])
                    if not writer.cancelled():
                        writer.exception()
                    call.cancel()
                    # What the broken stream did not answer goes first on the next one.
                    async with self._changed:
                        self.resent += sum(len(batch) for batch in self._pending)
                        self._unsent.extendleft(reversed(self._pending))
                        self._pending.clear()
                attempt += 1
                if self._backoff.max_attempts is not None and attempt > self._backoff.max_attempts:
                    raise failure
                await asyncio.sleep(self._backoff.delay(attempt - 1))
        except TidewatchError as error:
            await self._fail(error)
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - surfaced to the caller as a TidewatchError
            await self._fail(TidewatchError(f"ingest session failed: {error!r}"))
            return
        self._verdicts.put_nowait(_End())

    async def _fail(self, error: TidewatchError) -> None:
        self._error = error
        self._verdicts.put_nowait(error)
        async with self._changed:
            self._changed.notify_all()

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        """Write queued messages to ``call``; the first carries the detector."""
        first = True
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._unsent or (self._closing and not self._buffer and not self._moved)
                )
                if not self._unsent:
                    break
                batch = self._unsent.popleft()
                self._pending.append(batch)
            request = pb.IngestRequest(samples=batch)
            if first and self._detector is not None:
                request.detector.CopyFrom(self._detector)
            first = False
            await call.write(request)
        await call.done_writing()
