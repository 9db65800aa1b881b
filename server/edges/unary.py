"""The common unary Connect call served without the connectrpc runtime: a POST of one message
as `application/json` or `application/proto`, uncompressed, without a deadline. Everything else
(other content types, compressed bodies, `connect-timeout-ms`, GET, streams, wrong methods)
goes to the runtime's application behind, unchanged.

Why: profiled under the bench, the runtime's own bookkeeping per call (header multidicts, the
request context, interceptor runs, timeout scopes, a task watching for a disconnect) cost more
CPU than any step of the call pipeline itself, the database call included: GetBalance's
application CPU went from about 230 to 135 µs a call without it (bench/RESULTS.md).

It runs the same pipeline (server/edges/calls.py) through the same interceptor (connect.Pipeline)
and codecs, and answers as the runtime does (the same headers, status codes
and error bodies, written by the runtime's own ConnectWireError), with two differences: the
answer has a content-length (no chunked encoding), and an answer is gzip-compressed (when the
caller accepts gzip) only from GZIP_MIN_BYTES on, since a smaller one only grows. A caller who
disconnects does not cancel the call: it runs to its end, as short as it is, and its answer is
dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from connectrpc._protocol import ConnectWireError  # the runtime's own error bodies
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from server.edges import calls
from server.edges.calls import Calls
from server.edges.http import ASGIApp, Receive, Scope, Send
from server.observability.calls import REQUEST_ID_HEADER, CallRecord

# Answers from this size on are compressed for a caller that accepts gzip.
GZIP_MIN_BYTES = 1024

_CODECS = {b"application/json": "json", b"application/proto": "proto"}
_CONTENT_TYPES = {name: content_type for content_type, name in _CODECS.items()}
_GZIP = GzipCompression()
_VARY = (b"vary", b"Accept-Encoding")
# How a call's outcome is told and logged (connect.Pipeline.ended): the ConnectError the
# runtime would answer, or the cancellation itself.
Ended = Callable[[CallRecord, BaseException], BaseException | None]


class _Method:
    """A unary method: its path (the call's name in logs and metrics), its request type and
    the servicer's behaviour."""

    __slots__ = ("behaviour", "name", "request_type")

    def __init__(self, name: str, request_type: type[Message], behaviour: Callable[..., Any]):
        self.name = name
        self.request_type = request_type
        self.behaviour = behaviour


class LeanUnary:
    """`runtime` (the connectrpc application serving `servicer`) with its common unary calls
    served here, through `pipeline`, with the codecs of `codecs` (by name), each call's outcome
    told by `ended` (connect.Pipeline.ended: what the runtime would tell, the call logged)."""

    def __init__(
        self,
        runtime: ASGIApp,
        servicer: object,
        service: ServiceDescriptor,
        pipeline: Calls,
        ended: Ended,
        codecs: Mapping[str, Codec[Any, Any]],
        *,
        max_receive_bytes: int,
    ) -> None:
        self._runtime = runtime
        self._calls = pipeline
        self._ended = ended
        self._codecs = codecs
        self._max_receive_bytes = max_receive_bytes
        self._methods: dict[str, _Method] = {}
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue
            name = f"/{service.full_name}/{method.name}"
            request_type = message_factory.GetMessageClass(method.input_type)
            self._methods[name] = _Method(name, request_type, getattr(servicer, method.name))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = self._methods.get(scope["path"]) if scope["method"] == "POST" else None
        plain = _plain(scope["headers"]) if method is not None else None
        if method is None or plain is None:
            await self._runtime(scope, receive, send)
            return
        codec, headers, accept_gzip = plain
        await self._serve(method, self._codecs[codec], headers, accept_gzip, receive, send)

    async def _serve(
        self,
        method: _Method,
        codec: Codec[Any, Any],
        headers: list[tuple[str, str]],
        accept_gzip: bool,
        receive: Receive,
        send: Send,
    ) -> None:
        pipeline = self._calls
        record = pipeline.open(method.name, headers, None)
        try:
            principal = await pipeline.admit(headers, record)
            body = await self._read(receive)
            request = codec.decode(body, method.request_type)
            response: Message = await pipeline.run(
                principal, lambda: method.behaviour(request, None)
            )
            pipeline.check_size(response.ByteSize())
            answer: bytes = codec.encode(response)
        except BaseException as error:
            told = self._ended(record, error)
            if not isinstance(told, ConnectError):
                raise  # a cancellation: the caller is gone or the server is stopping
            await _send_error(send, told, record)
            return
        calls.finish(record)
        encoding = b"identity"
        if accept_gzip and len(answer) >= GZIP_MIN_BYTES:
            answer, encoding = _GZIP.compress(answer), b"gzip"
        response_headers = [
            (b"content-type", _CONTENT_TYPES[codec.name()]),
            (b"content-encoding", encoding),
            _VARY,
            (_REQUEST_ID, record.request_id.encode()),
            (b"content-length", str(len(answer)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": answer})

    async def _read(self, receive: Receive) -> bytes:
        """The request's body, read as the runtime reads it: RESOURCE_EXHAUSTED past the limit,
        CANCELED when the caller leaves first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectError(Code.CANCELED, "Client disconnected before request completion")
            if message["type"] != "http.request":
                raise ConnectError(Code.UNKNOWN, "Unexpected message type")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._max_receive_bytes:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"message is larger than configured max {self._max_receive_bytes}",
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_REQUEST_ID = REQUEST_ID_HEADER.encode()


def _plain(raw: list[tuple[bytes, bytes]]) -> tuple[str, list[tuple[str, str]], bool] | None:
    """A request's codec, its headers as text and whether its caller accepts gzip; None when
    the runtime is to serve it: another content type, a compressed body, a deadline, another
    protocol version, or a header that is no UTF-8 (the runtime's own answer to each)."""
    codec: str | None = None
    accept_gzip = False
    headers: list[tuple[str, str]] = []
    for name, value in raw:
        if name == b"content-type":
            if codec is not None or value not in _CODECS:
                return None
            codec = _CODECS[value]
        elif name == b"content-encoding":
            if value != b"identity":
                return None
        elif name == b"connect-timeout-ms":
            return None
        elif name == b"connect-protocol-version":
            if value != b"1":
                return None
        elif name == b"accept-encoding":
            accept_gzip = _negotiates_gzip(value)
        try:
            headers.append((name.decode(), value.decode()))
        except UnicodeDecodeError:
            return None
    return None if codec is None else (codec, headers, accept_gzip)


def _negotiates_gzip(accept_encoding: bytes) -> bool:
    """Whether the runtime's negotiation picks gzip: the first of the names it knows."""
    for accepted in accept_encoding.split(b","):
        name = accepted.strip()
        if name in (b"gzip", b"identity"):
            return name == b"gzip"
    return False


async def _send_error(send: Send, error: ConnectError, record: CallRecord) -> None:
    """`error` as the runtime answers it: its HTTP status and JSON body."""
    wire = ConnectWireError.from_exception(error)
    body = wire.to_json_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (_REQUEST_ID, record.request_id.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    status = wire.to_http_status().code
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
