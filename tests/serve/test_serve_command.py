"""`mosaic-ray serve` stopped with SIGTERM: it drains, exits 0, and a second `mosaic-ray serve`
with the same config (a fresh private Ray cluster, so no stream map) finds the stream in its frame
log with every acknowledged frame. Two cluster starts: about 40 s on 2 cores."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, free_port
from tests.runtime.fake_engine import FACTORY

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
BATCHES = 4
PER_BATCH = 2


def _jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _write_config(tmp_path, port: int) -> str:
    cfg = {
        "ray": {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 100 * 2**20},
        "http": {"host": "127.0.0.1", "port": port},
        "drain_timeout_s": 5,
        "app": {
            "runtime": {
                "name": "sigterm", "num_shards": 1,
                "engine": {"factory": FACTORY},
                "shard": {"num_gpus": 1, "num_cpus": 0},
                "router": {"health_interval_s": 0},
                "durability": {"root": str(tmp_path / "log"), "fsync": "never"},
            },
            "ingress": {"num_cpus": 0},
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class Server:
    """`mosaic-ray serve` in a subprocess; its output is read by a thread (Ray logs a lot)."""

    def __init__(self, config: str, ray_tmp: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "mosaic_ray.cli", "serve", "--config", config],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(line.startswith("mosaic-ray: serving") for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output
            time.sleep(0.3)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit {STOP_TIMEOUT_S} s after SIGTERM:\n{self.output}") from None
        self._reader.join(timeout=10)
        return self.proc.returncode


@pytest.fixture
def ray_tmp():
    """A short directory: Ray's socket paths must stay under 107 bytes."""
    path = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sigterm_drains_and_a_restart_finds_the_stream(tmp_path, ray_tmp):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _write_config(tmp_path, port)

    first = Server(config, ray_tmp)
    try:
        first.wait_serving()
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/streams", json={"id": "kept"}).status_code == 201
            for seq in range(BATCHES):
                frames = [{"ts": float(seq * PER_BATCH + i), "jpeg": _jpeg(30 * seq + i)} for i in range(PER_BATCH)]
                body = msgpack.packb({"seq": seq, "frames": frames}, use_bin_type=True)
                ack = http.post("/v1/streams/kept/frames", content=body,
                                headers={"content-type": "application/msgpack"})
                assert ack.status_code == 200, ack.text
            assert http.post("/v1/streams/kept/text", json={"text": "hello", "ts": 9.0}).status_code == 200
    finally:
        rc = first.stop()
    assert rc == 0, first.output
    assert "drained 1 shard(s), 0 request(s) cut off" in first.output, first.output

    second = Server(config, ray_tmp)
    try:
        second.wait_serving()
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 30
            while (info := http.get("/v1/streams/kept")).status_code == 503 and time.monotonic() < deadline:
                assert "retry-after" in info.headers
                time.sleep(0.3)
            assert info.status_code == 200, info.text
            assert (info.json()["frames"], info.json()["last_seq"]) == (BATCHES * PER_BATCH, BATCHES - 1)
            assert info.json()["texts"] == 1
    finally:
        rc = second.stop()
    assert rc == 0, second.output
