"""HeaderGuard: a TCP front for Serve's HTTP proxy that bounds how long a request's headers may
take to arrive (408) and how large they may be (431).

Why: Ray Serve's proxy runs uvicorn, which has no header-read timeout (its keep-alive timer is
cancelled by any byte received), and Serve exposes no protocol option; the ASGI app (`body_limit.py`
bounds bodies) runs only once the headers are complete. So a client that sends a header line
every few seconds holds a connection, and a file descriptor, for ever. `mosaic-ray serve` listens
on the public address itself and hands each connection to the proxy on a loopback port.

Per connection, one request at a time (HTTP/1.1, keep-alive and pipelining included):
- the request head (request line + headers, up to the blank line) must arrive within
  `header_timeout_s` of its first byte, else the client gets 408 `request_timeout` and the
  connection is closed; a head over `max_header_bytes` gets 431 `headers_too_large`;
- between requests, a connection idle for `idle_timeout_s` is closed (uvicorn's keep-alive does
  the same after a response);
- the head and the body are then passed on byte for byte: the body framed by Content-Length, or
  by its chunks (Transfer-Encoding: chunked), so the next request's head is found and timed too;
  bodies are timed and bounded by the app (`body_limit.py`: 408 / 413), not here;
- a WebSocket (or any) upgrade passes the rest of the connection through both ways, untimed;
- responses flow back untouched; when the proxy closes its side, the client's closes too.

Invariants: every byte the client sent is forwarded in order and none is added; a connection is
refused (408 / 431 / 400) only before its request reached the proxy, so a refused request reached
no route code; a malformed framing (a bad Content-Length or chunk size) is 400 `bad_request`.
The proxy sees the guard as its client (127.0.0.1); nothing in the app uses the peer address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # one header read, and the longest chunk-size line of a chunked body
BODY_READ = 1 << 20  # body reads (and the stream buffers' limit): straight through, this much at a time


@dataclass(slots=True, frozen=True)
class GuardLimits:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 90.0
    max_header_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        if not (self.header_timeout_s > 0 and self.idle_timeout_s > 0 and self.max_header_bytes >= 1024):
            raise ValueError(f"invalid header guard limits: {self}")


class _Refuse(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def refusal(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response in the service's error format, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Client:
    """The client side of one connection: a buffer over its reader."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader, self.buf = reader, bytearray()

    async def more(self, timeout: float | None) -> bool:
        """Read what is there into the buffer; False at end of stream."""
        chunk = await asyncio.wait_for(self.reader.read(CHUNK), timeout) if timeout is not None \
            else await self.reader.read(CHUNK)
        self.buf += chunk
        return bool(chunk)

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def _read_head(client: _Client, limits: GuardLimits) -> bytes | None:
    """The next request head (through its blank line); None when the client closed between
    requests. Raises `_Refuse` on a slow or oversized head; TimeoutError when idle too long."""
    if not client.buf and not await client.more(limits.idle_timeout_s):
        return None
    start = time.monotonic()
    slow = _Refuse(408, "request_timeout", f"request headers not complete within {limits.header_timeout_s:g} s")
    while (end := client.buf.find(b"\r\n\r\n")) < 0:
        if len(client.buf) > limits.max_header_bytes:
            raise _Refuse(431, "headers_too_large", f"request headers over {limits.max_header_bytes} bytes")
        left = limits.header_timeout_s - (time.monotonic() - start)
        if left <= 0:
            raise slow
        try:
            got = await client.more(left)
        except asyncio.TimeoutError:
            raise slow from None
        if not got:
            raise EOFError
    if end + 4 > limits.max_header_bytes:
        raise _Refuse(431, "headers_too_large", f"request headers over {limits.max_header_bytes} bytes")
    return client.take(end + 4)


def _framing(head: bytes) -> tuple[str, int]:
    """('upgrade' | 'chunked' | 'length', content length) of a request head."""
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            key = name.strip().lower().decode("latin-1")
            fields[key] = (fields[key] + "," if key in fields else "") + value.strip().decode("latin-1")
    if "upgrade" in fields and "upgrade" in fields.get("connection", "").lower():
        return "upgrade", 0
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return "chunked", 0
    raw = fields.get("content-length", "0").split(",")[0].strip() or "0"
    if not raw.isdigit():
        raise _Refuse(400, "bad_request", "invalid Content-Length")
    return "length", int(raw)


class HeaderGuard:
    """Listen on (host, port); pass each connection to `upstream` under `limits`.
    Verbs: start / close; `refused` counts the connections refused, by status."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: GuardLimits | None = None) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.limits = limits or GuardLimits()
        self.refused: dict[int, int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.Task] = set()  # one per connection being served

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=BODY_READ)
        self.port = self._server.sockets[0].getsockname()[1]  # port 0: the one chosen

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._open):
                task.cancel()
            await asyncio.gather(*self._open, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._open.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass  # `close`: the connection is closed by `_relay` on its way out
        finally:
            self._open.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(reader)
        up_writer: asyncio.StreamWriter | None = None
        back: asyncio.Task | None = None  # the proxy's bytes to the client, raw
        try:
            head = await _read_head(client, self.limits)  # before the proxy is even dialled
            while head is not None:
                kind, length = _framing(head)
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=BODY_READ)
                    back = asyncio.create_task(_pipe(up_reader, writer))
                up_writer.write(head)
                if kind == "upgrade":  # a WebSocket: both ways until either side ends
                    up_writer.write(client.take(len(client.buf)))
                    forth = asyncio.create_task(_pipe(reader, up_writer))
                    await asyncio.wait([back, forth], return_when=asyncio.FIRST_COMPLETED)
                    forth.cancel()
                    return
                await (self._chunked(client, up_writer) if kind == "chunked" else self._body(client, up_writer, length))
                await up_writer.drain()
                head = await self._next_head(client, back)
            if up_writer is not None:  # the client is done: the last response, then the proxy's close
                up_writer.write_eof()
                await asyncio.wait_for(back, self.limits.idle_timeout_s)
        except _Refuse as exc:
            self.refused[exc.status] = self.refused.get(exc.status, 0) + 1
            if back is None:  # nothing reached the proxy: answer; later, earlier responses may be in flight
                writer.write(refusal(exc.status, exc.code, exc.message))
                await writer.drain()
        except (asyncio.TimeoutError, EOFError, ConnectionError):
            pass  # idle, gone or reset: close
        except OSError as exc:
            log.warning("header guard: upstream %s:%d unreachable: %s", *self.upstream, exc)
        finally:
            if back is not None:
                back.cancel()
            for w in (up_writer, writer):
                if w is not None:
                    w.close()

    async def _next_head(self, client: _Client, back: asyncio.Task) -> bytes | None:
        """The next request's head, or None once the client or the proxy closed the connection."""
        reading = asyncio.ensure_future(_read_head(client, self.limits))
        await asyncio.wait([reading, back], return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            reading.cancel()
            return None
        return reading.result()

    @staticmethod
    async def _body(client: _Client, up: asyncio.StreamWriter, length: int) -> None:
        """`length` body bytes: what the buffer holds, then straight from the socket (no copy
        through the buffer: large frame batches pass at the proxy's own speed)."""
        if client.buf and length > 0:
            part = client.take(min(length, len(client.buf)))
            length -= len(part)
            up.write(part)
        while length > 0:
            chunk = await client.reader.read(min(length, BODY_READ))
            if not chunk:
                raise EOFError
            length -= len(chunk)
            up.write(chunk)
            await up.drain()

    @staticmethod
    async def _chunked(client: _Client, up: asyncio.StreamWriter) -> None:
        async def line() -> bytes:
            while (end := client.buf.find(b"\r\n")) < 0:
                if len(client.buf) > CHUNK:
                    raise _Refuse(400, "bad_request", "chunk size line too long")
                if not await client.more(None):
                    raise EOFError
            return client.take(end + 2)

        while True:
            size_line = await line()
            up.write(size_line)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise EOFError from None  # the proxy answers the bad framing; the connection ends
            if size == 0:
                while (trailer := await line()) != b"\r\n":
                    up.write(trailer)
                up.write(trailer)
                return
            await HeaderGuard._body(client, up, size + 2)  # the data and its CRLF


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool = True) -> None:
    """Bytes from `reader` to `writer` until end of stream."""
    try:
        while chunk := await reader.read(BODY_READ):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        if close:
            writer.close()


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the proxy behind the guard)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_thread(guard: HeaderGuard) -> Callable[[], None]:
    """Serve `guard` on its own event loop in a daemon thread; returns once it listens (raises
    the bind's OSError, e.g. the port in use, here). The returned function stops it."""
    started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
    stopped = threading.Event()

    async def main() -> None:
        try:
            await guard.start()
        except OSError as exc:
            started.set_exception(exc)
            return
        started.set_result(asyncio.get_running_loop())
        while not stopped.is_set():
            await asyncio.sleep(0.2)
        await guard.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="header-guard", daemon=True)
    thread.start()
    started.result()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)

    return stop
