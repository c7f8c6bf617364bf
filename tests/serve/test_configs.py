"""Every file in cluster_configs/ validates against the schema it is written for."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mosaic_ray.runtime.config import DEFAULT_ENGINE_FACTORY
from mosaic_ray.serve.command import load_config
from mosaic_ray.serve.config import AppConfig

CONFIGS = Path(__file__).resolve().parents[2] / "cluster_configs"


def _flags(**kw) -> argparse.Namespace:
    base = {"address": None, "host": None, "port": None, "num_shards": None, "engine": None}
    return argparse.Namespace(**{**base, **kw})


def test_launch_configs_validate_and_flags_override_them():
    for name in ("local.yaml", "single_node_multi_gpu.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.app.runtime.engine.factory == DEFAULT_ENGINE_FACTORY
    local = load_config(CONFIGS / "local.yaml", _flags(port=9001, num_shards=3, engine="pkg.mod:Factory"))
    rt = local.app.runtime
    assert (local.http.port, rt.num_shards, rt.engine.factory) == (9001, 3, "pkg.mod:Factory")
    assert local.app.runtime.engine.kwargs["model"] == "tiny"


def test_the_serve_config_args_are_an_app_config():
    serve_cfg = yaml.safe_load((CONFIGS / "serve.yaml").read_text())
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "mosaic_ray.serve.app:build_app"
    assert AppConfig(**app["args"]).runtime.num_shards == 2


def test_the_cluster_launcher_file_has_what_ray_up_needs():
    launcher = yaml.safe_load((CONFIGS / "multi_node_cluster.yaml").read_text())
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(launcher)
