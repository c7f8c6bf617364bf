"""`mosaic-ray demo --realtime`: the demo of `demo_serve.py`, over the realtime WebSocket.

Same app and engine as `--serve`; the client side is one `RealtimeSession`: frames go as they
come (JPEG, acknowledged one by one, `--batch` of them in flight), captions as context items at
their timestamps, then each question as a `response.create` whose answer is printed delta by
delta. With `--prune`, the stream drops near-duplicate frames before the encoder and the acks
say which.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from mosaic_ray.demo_script import demo_script

STREAM_ID = "demo-rt"


def play(url: str, args: argparse.Namespace, video: str, info: dict) -> int:
    from mosaic_ray.client.realtime import RealtimeSession
    from mosaic_ray.video import read_frames

    frames = list(read_frames(video, fps=args.fps, max_frames=args.max_frames))
    captions, questions = demo_script(args, video, info["duration_s"])
    with RealtimeSession(url, stream_id=STREAM_ID, pruning=True if args.prune else None, timeout_s=600) as rt:
        print(f"realtime session {rt.session['id']} on stream {rt.stream_id!r} (resumes after seq "
              f"{rt.next_seq - 1})", flush=True)
        t0, pruned = time.perf_counter(), 0
        with tqdm(total=len(frames), unit="frame", desc="ingest (WebSocket)") as bar:
            for i in range(0, len(frames), args.batch):
                batch = frames[i : i + args.batch]
                while captions and captions[0][0] <= batch[0].ts:
                    ts, text = captions.pop(0)
                    rt.add_text(text, ts=ts)
                acks = rt.push([(f.ts, f.rgb) for f in batch], window=args.batch)
                pruned += sum(a.get("pruned") or 0 for a in acks)
                bar.update(len(batch))
        for ts, text in captions:
            rt.add_text(text, ts=ts)
        done = rt.commit()
        took = time.perf_counter() - t0
        print(f"sent {len(frames)} frames over the WebSocket in {took:.1f} s = {len(frames) / took:.1f} frames/s; "
              f"acknowledged through seq {done['last_seq']}, {done['frames']} in the stream, {pruned} pruned",
              flush=True)
        for q in questions:
            print(f"Q: {q}\nA: ", end="", flush=True)
            start, first, text = time.perf_counter(), None, ""
            for delta in rt.ask_stream(q, max_tokens=args.max_tokens):
                first = first or time.perf_counter()
                delta = delta if text else delta.lstrip()
                text += delta
                print(delta, end="", flush=True)
            end = time.perf_counter()
            ttfd = f"{(first - start) * 1000:.0f} ms" if first else "-"
            print(f"\n   first delta {ttfd}, total {(end - start) * 1000:.0f} ms (WebSocket, streamed)", flush=True)
    return 0
