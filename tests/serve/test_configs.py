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
    base = {"address": None, "host": None, "port": None, "num_shards": None, "engine": None, "model": None,
            "log_dir": None}
    return argparse.Namespace(**{**base, **kw})


def test_launch_configs_validate_and_flags_override_them():
    for name in ("local.yaml", "local_tiny.yaml", "local_auth.yaml", "single_node_multi_gpu.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.app.runtime.engine.factory == DEFAULT_ENGINE_FACTORY
    local = load_config(CONFIGS / "local_tiny.yaml", _flags(port=9001, num_shards=3, engine="pkg.mod:Factory",
                                                            model="/ckpt"))
    rt = local.app.runtime
    assert (local.http.port, rt.num_shards, rt.engine.factory) == (9001, 3, "pkg.mod:Factory")
    assert rt.engine.kwargs["model"] == "/ckpt"


def test_the_newcomers_config_runs_real_weights_and_the_tiny_model_has_its_own():
    # issue 18: the config a newcomer finds first answers with the real small stack; the random
    # model only where its name says so (tests, smoke runs).
    assert load_config(CONFIGS / "local.yaml").app.runtime.engine.kwargs["model"] == "dino-smollm2"
    tiny = [p.name for p in CONFIGS.glob("*.yaml") if "model: tiny" in p.read_text()]
    assert tiny == ["local_tiny.yaml"]


def test_the_repository_folder_is_the_packaged_one():
    assert CONFIGS.resolve() == (Path(__file__).resolve().parents[2] / "mosaic_ray" / "cluster_configs")


def test_the_serve_config_args_are_an_app_config():
    serve_cfg = yaml.safe_load((CONFIGS / "serve.yaml").read_text())
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "mosaic_ray.serve.app:build_app"
    assert AppConfig(**app["args"]).runtime.num_shards == 2


def test_the_cluster_launcher_file_has_what_ray_up_needs():
    launcher = yaml.safe_load((CONFIGS / "multi_node_cluster.yaml").read_text())
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(launcher)
