"""RealtimeSession: the Python client of the realtime WebSocket endpoint (docs/realtime.md).

    with RealtimeSession("http://127.0.0.1:8000", stream_id="cam-1", pruning=True) as rt:
        for f in frames_from("clip.mp4", fps=2):
            rt.append_frame(f.rgb, f.ts)             # acked once the shard holds it
        rt.add_text("A red car parks.", ts=12.0)     # context text (a caption)
        for delta in rt.ask_stream("What parked?"):
            print(delta, end="")

Synchronous (the `websockets` package's sync client); one session per object, one stream per
session. Frames go as JPEG in `input_video_frame.append` events with increasing seq, starting
after the stream's `last_seq`, so a session opened again on the same stream (a reconnect)
continues where the acknowledged frames end. `push` keeps up to `window` frames in flight.
A server `error` event raises `MosaicAPIError(status, code, message)`; the session stays open.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import numpy as np

from mosaic_ray.bounds import check_stream_id
from mosaic_ray.client.encoding import encode_jpeg
from mosaic_ray.client.errors import MosaicAPIError

SKIP = frozenset({"heartbeat", "pong"})
# Events kept when they arrive while another kind is awaited (acks of frames still in flight);
# others nobody waits for (response.created, ...) are dropped.
KEEP = frozenset({"input_video_frame.appended"})


def ws_url(base_url: str, stream_id: str | None = None) -> str:
    """`http(s)://host:port[/prefix]` -> `ws(s)://host:port[/prefix]/v1/realtime[?stream_id=]`; an id
    outside the server's grammar is a `ValueError` before any connection."""
    url = base_url.rstrip("/")
    url = "ws://" + url[7:] if url.startswith("http://") else "wss://" + url[8:] if url.startswith("https://") else url
    return url + "/v1/realtime" + (f"?stream_id={quote(check_stream_id(stream_id), safe='')}" if stream_id else "")


class RealtimeSession:
    def __init__(self, base_url: str, stream_id: str | None = None, *, api_key: str | None = None,
                 pruning: bool | None = None, prune_threshold: float | None = None, max_tokens: int | None = None,
                 jpeg_quality: int = 85, timeout_s: float = 120.0) -> None:
        """Open a session on `stream_id` (created when missing), or on a new stream when None."""
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout_s, self.jpeg_quality = timeout_s, jpeg_quality
        self.ws = connect(ws_url(base_url, stream_id), additional_headers=headers, max_size=None,
                          open_timeout=timeout_s)
        self._pending: list[dict] = []  # acks read while waiting for another kind
        self.session = self._until("session.created")["session"]
        options = {k: v for k, v in (("pruning", pruning), ("prune_threshold", prune_threshold),
                                     ("max_tokens", max_tokens)) if v is not None}
        if stream_id is None or options:
            self.update(new_stream=stream_id is None, **options)
        self.next_seq = int(self.session.get("last_seq", -1)) + 1
        self.acks: list[dict] = []
        # The `response` of the last `response.done` (docs/realtime.md, How an answer ends): status,
        # output_text, deltas, finish_reason ("stop" | "length" | "cancelled" | "error") and usage
        # ({prompt_tokens, completion_tokens, total_tokens} as the engine counts them, or None).
        self.last_response: dict | None = None

    @property
    def stream_id(self) -> str:
        return self.session["stream_id"]

    # ------------------------------------------------------------------ session
    def update(self, **options: Any) -> dict:
        """`session.update`: stream_id | new_stream, pruning, prune_threshold, max_tokens, ...; returns the session."""
        self._send({"type": "session.update", "session": {k: v for k, v in options.items() if v is not None}})
        self.session = self._until("session.updated")["session"]
        return self.session

    def close(self) -> None:
        """Finish what was sent (every frame acked), then close cleanly."""
        try:
            self._send({"type": "session.close"})
            self._until("session.closed")
        finally:
            self.ws.close()

    def __enter__(self) -> RealtimeSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ input
    def append_frame(self, frame: np.ndarray | bytes, ts: float, seq: int | None = None) -> dict:
        """Send one frame (RGB array, or JPEG/PNG bytes) and wait for its ack; returns the ack."""
        self._send_frame(frame, ts, seq)
        return self._ack()

    def push(self, frames: Iterable[tuple[float, np.ndarray | bytes]], window: int = 8) -> list[dict]:
        """Send (ts, frame) pairs with up to `window` unacknowledged; returns every ack, in order."""
        acks, in_flight = [], 0
        for ts, frame in frames:
            if in_flight >= window:
                acks.append(self._ack())
                in_flight -= 1
            self._send_frame(frame, ts, None)
            in_flight += 1
        acks += [self._ack() for _ in range(in_flight)]
        return acks

    def commit(self) -> dict:
        """Wait until every frame sent so far is acknowledged; returns {"last_seq", "frames"}."""
        self._send({"type": "input_video_buffer.commit"})
        return self._until("input_video_buffer.committed")

    def add_text(self, text: str, ts: float | None = None) -> None:
        """Timestamped text in the stream's context (a caption); default time: the last frame's."""
        event: dict[str, Any] = {"type": "conversation.item.create",
                                 "item": {"role": "system", "content": [{"type": "input_text", "text": text}]}}
        if ts is not None:
            event["ts"] = ts
        self._send(event)
        self._until("conversation.item.created")

    # ------------------------------------------------------------------ questions
    def ask_stream(self, question: str, **options: Any) -> Iterator[str]:
        """The answer's text deltas as they arrive (max_tokens, temperature, since, until, ...); once
        they end, `last_response` says why (`finish_reason`) and what it used (`usage`)."""
        self._send({"type": "response.create", "response": {"question": question, **options}})
        while True:
            ev = self._until("response.output_text.delta", "response.done")
            if ev["type"] == "response.done":
                self.last_response = ev["response"]
                if ev["response"]["status"] != "completed":
                    raise MosaicAPIError(0, ev["response"]["status"], "the response did not complete")
                return
            yield ev["delta"]

    def ask(self, question: str, **options: Any) -> str:
        return "".join(self.ask_stream(question, **options))

    # ------------------------------------------------------------------ wire
    def _send_frame(self, frame: np.ndarray | bytes, ts: float, seq: int | None) -> None:
        data = frame if isinstance(frame, bytes) else encode_jpeg(frame, self.jpeg_quality)
        seq = self.next_seq if seq is None else seq
        self.next_seq = max(self.next_seq, seq + 1)
        self._send({"type": "input_video_frame.append", "seq": seq, "ts": float(ts),
                    "image": base64.b64encode(data).decode()})

    def _ack(self) -> dict:
        ack = self._until("input_video_frame.appended")
        self.acks.append(ack)
        return ack

    def _send(self, event: dict) -> None:
        self.ws.send(json.dumps(event))

    def _until(self, *kinds: str) -> dict:
        """The next event of one of `kinds` (earlier events of other kinds are kept for later);
        an `error` raises."""
        for i, ev in enumerate(self._pending):
            if ev["type"] in kinds:
                return self._pending.pop(i)
        while True:
            ev = json.loads(self.ws.recv(timeout=self.timeout_s))
            kind = ev["type"]
            if kind in SKIP:
                continue
            if kind == "error":
                err = ev["error"]
                raise MosaicAPIError(int(err.get("status") or 400), err["code"], err["message"])
            if kind in kinds:
                return ev
            if kind in KEEP:
                self._pending.append(ev)
