"""A realtime session over the raw WebSocket protocol (docs/realtime.md), with the `websockets`
package only: what any realtime client in any language does.

    mosaic-ray serve                                                     # in one terminal
    python examples/realtime_client.py --stream cam-1 --fps 2 --prune    # in another

Opens /v1/realtime?stream_id=..., switches pruning on, sends the video's frames as base64 JPEG
`input_video_frame.append` events (seq continuing after the stream's last acknowledged one, so
running it twice resumes the stream), adds a caption, asks a question and prints the answer as its
`response.output_text.delta` events arrive. The Python client wraps the same protocol:
`mosaic_ray.client.RealtimeSession`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json

from PIL import Image
from websockets.sync.client import connect

from mosaic_ray.video import default_video, read_frames


def until(ws, kind: str) -> dict:
    """The next server event of `kind`; prints errors and skips heartbeats."""
    while True:
        ev = json.loads(ws.recv())
        if ev["type"] == "error":
            print(f"  error {ev['error']['code']}: {ev['error']['message']}")
        if ev["type"] == kind:
            return ev


def jpeg_b64(rgb) -> str:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=85)
    return base64.b64encode(out.getvalue()).decode()


def main(a: argparse.Namespace) -> None:
    url = a.url.replace("http", "ws", 1).rstrip("/") + f"/v1/realtime?stream_id={a.stream}"
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    with connect(url, additional_headers=headers, max_size=None) as ws:
        session = until(ws, "session.created")["session"]
        print(f"session {session['id']} on stream {session['stream_id']}: {session.get('frames') or 0} frames, "
              f"last seq {session.get('last_seq')}")
        if a.prune:
            ws.send(json.dumps({"type": "session.update", "session": {"pruning": True}}))
            until(ws, "session.updated")
        seq, t0 = session.get("last_seq", -1) + 1, session.get("duration_s") or 0.0
        for f in read_frames(a.video or default_video(), fps=a.fps, size=a.size, max_frames=a.max_frames):
            ws.send(json.dumps({"type": "input_video_frame.append", "seq": seq, "ts": t0 + f.ts + 0.01,
                                "image": jpeg_b64(f.rgb)}))
            ack = until(ws, "input_video_frame.appended")
            print(f"  frame seq {ack['seq']} at {ack['ts'][0]:.2f} s acked"
                  + (" (pruned)" if ack.get("pruned") else ""))
            seq += 1
        ws.send(json.dumps({"type": "conversation.item.create",
                            "item": {"role": "system", "content": [{"type": "input_text", "text": a.caption}]}}))
        until(ws, "conversation.item.created")
        ws.send(json.dumps({"type": "response.create", "response": {"question": a.question, "max_tokens": 24}}))
        print(f"Q: {a.question}\nA: ", end="", flush=True)
        while True:
            ev = json.loads(ws.recv())
            if ev["type"] == "response.output_text.delta":
                print(ev["delta"], end="", flush=True)
            elif ev["type"] == "response.done":
                r = ev["response"]  # finish_reason: stop | length | cancelled | error; usage: tokens or None
                print(f"\n   {r['status']}, first delta {r['ttft_ms'] or 0:.0f} ms, finish_reason {r['finish_reason']}, "
                      f"usage {r['usage']}")
                break
        ws.send(json.dumps({"type": "session.close"}))
        until(ws, "session.closed")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--stream", default="cam-1")
    p.add_argument("--video", default=None)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-frames", type=int, default=20)
    p.add_argument("--prune", action="store_true", help="drop near-duplicate frames before the encoder")
    p.add_argument("--caption", default="A big white rabbit named Bob wakes up under a tree.")
    p.add_argument("--question", default="What is the rabbit's name?")
    p.add_argument("--api-key", default=None)
    main(p.parse_args())
