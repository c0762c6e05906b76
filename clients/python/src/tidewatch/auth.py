"""TLS settings and bearer tokens for a server with authentication on.

``tls(ca=..., cert=..., key=...)`` makes the ``grpc.ChannelCredentials`` a client takes
as ``credentials``; ``token`` (a string, or a callable returning the current one) is
sent as ``authorization: Bearer <token>`` on every call by an interceptor, so it works
over TLS and over a plaintext loopback channel alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from os import PathLike
from typing import Any, Union

import grpc

__all__ = ["tls", "Token", "token_interceptors"]

#: A token: fixed, or a callable (plain or ``async``) that returns the current one.
Token = Union[str, Callable[[], str], Callable[[], Awaitable[str]]]

PemSource = Union[bytes, str, "PathLike[str]", None]


def _pem(source: PemSource) -> bytes | None:
    # Bytes are PEM already; a str or path names a file.
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as file:
        return file.read()


def tls(
    ca: PemSource = None,
    cert: PemSource = None,
    key: PemSource = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for TLS.

    ``ca`` is the CA that signed the server's certificate (PEM bytes or a file path;
    ``None`` uses gRPC's default roots). ``cert`` and ``key`` are the client's
    certificate chain and private key for mutual TLS; give both or neither.
    """
    if (cert is None) != (key is None):
        raise ValueError("mutual TLS needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca),
        private_key=_pem(key),
        certificate_chain=_pem(cert),
    )


class _TokenMetadata:
    """Adds ``authorization: Bearer <token>`` to a call's metadata.

    A callable token is called when each call opens (the server checks the token once
    per call, so an Ingest stream keeps the token it opened with; a reconnect picks up
    the new one). It runs on the event loop: return a token held in memory, or make it
    ``async`` when it must fetch one.
    """

    def __init__(self, token: Token) -> None:
        self._token = token

    async def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        token: Any = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata["authorization"] = f"Bearer {token}"
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


# One class per call kind: a grpc.aio channel files each interceptor under the first
# kind it is an instance of, so one object implementing all four would only ever see
# unary-unary calls.
class _UnaryUnary(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(await self._details(client_call_details), request)


class _UnaryStream(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(await self._details(client_call_details), request)


class _StreamUnary(_TokenMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(await self._details(client_call_details), request_iterator)


class _StreamStream(_TokenMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(await self._details(client_call_details), request_iterator)


def token_interceptors(token: Token) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that send ``token`` on every kind of call, for a
    ``grpc.aio`` channel of your own (``tidewatch.Client`` adds them itself)."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
