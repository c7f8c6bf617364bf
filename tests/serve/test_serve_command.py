"""`mosaic-ray serve`.

Before Ray starts (fast, no cluster): the packaged configs are found from any directory, a missing
config or an unknown model is one line on stderr and exit status 2, the start line names the
model's weights, a private cluster's frame logs go to a directory of their own per HTTP port, and
a second server on a locked frame-log directory refuses to start.

A private cluster gets Ray's token auth by name (RAY_AUTH_MODE=token, so Ray prints no auth
warning), a user's own RAY_AUTH_MODE is kept, and a joined cluster gets nothing set: checked at
the ray.init call with Ray faked, no cluster started.

Stopped with SIGTERM (slow): it drains, exits 0, and a second `mosaic-ray serve` with the same
config (a fresh private Ray cluster, so no stream map) finds the stream in its frame log with
every acknowledged frame. Two cluster starts: about 40 s on 2 cores."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
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

from mosaic_ray.cli import main

from mosaic_ray.runtime.durability.log_dir_lock import LogDirLock
from mosaic_ray.serve import command
from mosaic_ray.serve.command import LaunchError, load_config, packaged_configs, private_cluster_env
from tests.conftest import ROOT, free_port
from tests.runtime.fake_engine import FACTORY

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
        "http": {"host": "127.0.0.1", "port": port, "header_timeout_s": 1.0},
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


def _flags(**kw) -> argparse.Namespace:
    base = {"address": None, "host": None, "port": None, "num_shards": None, "engine": None, "model": None,
            "log_dir": None}
    return argparse.Namespace(**{**base, **kw})


def test_packaged_configs_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"local", "local_tiny", "local_auth", "single_node_multi_gpu"} <= set(packaged_configs())
    assert load_config("local").app.runtime.engine.kwargs["model"] == "dino-smollm2"  # the default: real weights
    assert load_config("local_tiny.yaml").app.runtime.engine.kwargs["model"] == "tiny"
    assert load_config("local", _flags(model="tiny")).app.runtime.engine.kwargs["model"] == "tiny"
    with pytest.raises(LaunchError, match=r"no config file 'cluster_configs/local.yaml' .*local, .*local_tiny"):
        load_config("cluster_configs/local.yaml")  # a relative path that is not here


def test_refusals_before_ray_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--config", "missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mosaic-ray serve: no config file 'missing.yaml'") and "Traceback" not in err
    assert main(["serve", "--model", str(tmp_path / "no-model")]) == 2
    assert "neither a model name" in capsys.readouterr().err


def test_private_clusters_get_a_log_directory_per_port(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_LOG_DIR", str(tmp_path))
    durability = load_config("local_tiny", _flags(port=9123)).app.runtime.durability
    assert durability.root == str(tmp_path / "port-9123")
    assert load_config("local_tiny", _flags(log_dir="/srv/logs")).app.runtime.durability.root == "/srv/logs"
    assert load_config("local_tiny", _flags(address="auto")).app.runtime.durability.root is None  # its nodes decide


def test_a_second_server_on_a_locked_log_directory_refuses_to_start(tmp_path, capsys):
    config = _write_config(tmp_path, free_port())
    held = LogDirLock.acquire(tmp_path / "log" / "sigterm", owner="http://127.0.0.1:8000")
    try:
        assert main(["serve", "--config", config]) == 2
    finally:
        held.release()
    out = capsys.readouterr()
    assert out.out.startswith(f"mosaic-ray: engine {FACTORY}")  # the start line came first
    assert f"frame-log directory {tmp_path / 'log' / 'sigterm'} is in use by another mosaic-ray server " \
           f"(pid {os.getpid()}, http://127.0.0.1:8000" in out.err
    assert "Traceback" not in out.err


def test_the_start_line_names_the_model_and_its_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOSAIC_RAY_CACHE", str(tmp_path))
    held = LogDirLock.acquire(tmp_path / "log" / "mosaic", owner="the test")  # stop right after the line
    try:
        assert main(["serve", "--config", "local_tiny", "--log-dir", str(tmp_path / "log")]) == 2
    finally:
        held.release()
    assert capsys.readouterr().out.startswith("mosaic-ray: model tiny: random-init weights (answers are noise")


def test_private_cluster_env_names_token_auth_and_keeps_the_users_choice():
    env: dict[str, str] = {}
    assert private_cluster_env(env) == {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    assert env == {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    assert private_cluster_env(env) == {}  # idempotent
    for users in ("disabled", "token", ""):
        env = {"RAY_AUTH_MODE": users, "RAY_USAGE_STATS_ENABLED": "1"}
        assert private_cluster_env(env) == {} and env == {"RAY_AUTH_MODE": users, "RAY_USAGE_STATS_ENABLED": "1"}
    assert "disabled" not in command.PRIVATE_CLUSTER_ENV.values()  # never opens a cluster on its own


class _AtRayInit(Exception):
    """Raised by the fake ray.init: `_serve` stops there, nothing of Ray started."""


def _at_ray_init(monkeypatch, config: str, **flags) -> tuple[dict, str | None, int]:
    """Run `_serve` up to ray.init: its kwargs, RAY_AUTH_MODE then, and how often Ray's cached
    config was reloaded (faked too: this test process keeps its own Ray config)."""
    import ray

    seen: dict = {}
    reloads: list[int] = []

    def fake_init(**kwargs):
        seen.update(kwargs, auth_mode=os.environ.get("RAY_AUTH_MODE"))
        raise _AtRayInit

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(command, "_reload_ray_config", lambda: reloads.append(1))
    cfg = load_config(config, _flags(**flags))
    with pytest.raises(_AtRayInit):
        command._serve(cfg, "http://127.0.0.1:8000", None)
    return seen, seen.pop("auth_mode"), len(reloads)


def test_a_private_cluster_starts_with_token_auth_named(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the README's `mosaic-ray serve`
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    kwargs, mode, reloads = _at_ray_init(monkeypatch, "local")
    assert kwargs["address"] == "local" and mode == "token" and reloads == 1
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_users_auth_mode_is_kept_and_a_joined_cluster_gets_none(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the tests' command
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert _at_ray_init(monkeypatch, "local")[1:] == ("disabled", 0)
    monkeypatch.delenv("RAY_AUTH_MODE")
    kwargs, mode, reloads = _at_ray_init(monkeypatch, "local", address="auto")
    assert kwargs["address"] == "auto" and mode is None and reloads == 0  # the cluster's own mode


def test_the_reload_makes_ray_see_the_mode_set_after_import():
    """In a fresh interpreter (Ray's config is per process): `ray` imported first, as the config
    checks do, then the private cluster's env; without the reload Ray would still read 'disabled'."""
    code = ("import os, ray\n"
            "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
            "from mosaic_ray.serve import command\n"
            "assert get_authentication_mode() == AuthenticationMode.DISABLED\n"
            "command.private_cluster_env(os.environ)\n"
            "assert get_authentication_mode() == AuthenticationMode.DISABLED\n"
            "command._reload_ray_config()\n"
            "assert get_authentication_mode() == AuthenticationMode.TOKEN, get_authentication_mode()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
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
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # a slow-drip head: 408
            start = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
            time.sleep(0.5)
            sock.sendall(b"x-drip: 1\r\n")
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply, reply
            assert time.monotonic() - start < 3
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
