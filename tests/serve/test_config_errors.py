"""A bad `mosaic-ray serve --config` file is refused when it is read (issue 18, point 7: a typo,
`retreival:`, was accepted and failed 23 s later inside Ray in 256 log lines).

Each problem is one line naming its dotted path in the YAML and the fields allowed there or the
range a value must be in, the engine's kwargs included (built into the dataclasses a shard
builds). Exit status 2, no traceback, and Ray is never imported. No cluster: a few seconds."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import yaml

from mosaic_ray.cli import main
from mosaic_ray.config import EngineConfig
from mosaic_ray.serve import command
from mosaic_ray.serve.command import LaunchError, load_config
from tests.conftest import ROOT
from tests.runtime.fake_engine import FACTORY

BASE = yaml.safe_load((ROOT / "cluster_configs" / "local_tiny.yaml").read_text())
KWARGS = "app.runtime.engine.kwargs"


def _config(tmp_path, edit) -> str:
    """local_tiny.yaml with `edit(cfg)` applied, written to a file; its path."""
    cfg = copy.deepcopy(BASE)
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _engine(cfg) -> dict:
    return cfg["app"]["runtime"]["engine"]["kwargs"]


def _refusal(path: str) -> list[str]:
    with pytest.raises(LaunchError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"config {path}: ") for line in lines), lines
    return [line.removeprefix(f"config {path}: ") for line in lines]


def test_a_typo_at_the_top_level_names_the_allowed_fields(tmp_path):
    path = _config(tmp_path, lambda c: c.update(htp=c.pop("http")))
    assert _refusal(path) == ["htp: unknown field (did you mean 'http'?); allowed: app, app_name, "
                              "drain_timeout_s, http, ray, route_prefix"]


def test_a_typo_in_a_nested_section_names_its_dotted_path(tmp_path):
    def edit(cfg):
        router = cfg["app"]["runtime"]["router"]
        router["skew_rato"] = router.pop("skew_ratio")
    (line,) = _refusal(_config(tmp_path, edit))
    assert line.startswith("app.runtime.router.skew_rato: unknown field (did you mean 'skew_ratio'?); allowed: ")
    assert "rebalance_interval_s, skew_ratio, state_store" in line


def test_a_typo_in_the_engine_kwargs_names_its_dotted_path(tmp_path):
    def edit(cfg):
        cache = _engine(cfg)["cache"]
        cache["retreival"] = cache.pop("retrieval")
    (line,) = _refusal(_config(tmp_path, edit))
    assert line == (f"{KWARGS}.cache.retreival: unknown field (did you mean 'retrieval'?); allowed: budget_ratio, "
                    "budget_tokens, cluster, fill, frame_top_k, min_budget_tokens, offload_batch, pool, retrieval, "
                    "scoring, sink_tokens, window_tokens")


def test_an_unknown_key_without_a_close_match_still_lists_the_fields(tmp_path):
    (line,) = _refusal(_config(tmp_path, lambda c: _engine(c).update(zzz=1)))
    assert line.startswith(f"{KWARGS}.zzz: unknown field; allowed: cache, cuda_graphs, device, ")


def test_a_value_out_of_range_names_the_range(tmp_path):
    path = _config(tmp_path, lambda c: _engine(c)["cache"].update(cluster={"variance_ratio": 700.0}))
    assert _refusal(path) == [f"{KWARGS}.cache.cluster.variance_ratio: Input should be less than or equal to 100, got float 700.0"]
    path = _config(tmp_path, lambda c: c["http"].update(port=0))
    assert _refusal(path) == ["http.port: Input should be greater than or equal to 1, got int 0"]


def test_a_value_of_the_wrong_type_names_the_type(tmp_path):
    path = _config(tmp_path, lambda c: _engine(c)["cache"].update(budget_ratio="high"))
    assert _refusal(path) == [f"{KWARGS}.cache.budget_ratio: Input should be a valid number, unable to parse string as a number, "
                              "got str 'high'"]
    path = _config(tmp_path, lambda c: _engine(c).update(cache=5, cuda_graphs="yes"))
    assert _refusal(path) == [f"{KWARGS}.cache: Input should be a valid dictionary or instance of CacheConfig, got int 5",
                              f"{KWARGS}.cuda_graphs: Input should be a valid boolean, got str 'yes'"]
    path = _config(tmp_path, lambda c: c["app"]["runtime"].update(num_shards="two"))
    assert _refusal(path) == ["app.runtime.num_shards: Input should be a valid integer, unable to parse string "
                              "as an integer, got str 'two'"]


def test_a_choice_outside_its_set_names_the_choices(tmp_path):
    path = _config(tmp_path, lambda c: _engine(c)["cache"].update(retrieval="clusters"))
    assert _refusal(path) == [f"{KWARGS}.cache.retrieval: Input should be 'full', 'frame', 'token' or 'cluster', "
                              "got str 'clusters'"]


def test_every_problem_is_a_line_of_its_own(tmp_path):
    def edit(cfg):
        cfg["http"]["prot"] = 1
        _engine(cfg)["pruning"] = {"threshold": 2.0}
        _engine(cfg)["scheduler"] = {"token_budgt": 1}
    lines = _refusal(_config(tmp_path, edit))
    assert [line.split(":")[0] for line in lines] == [
        "http.prot", f"{KWARGS}.pruning.threshold", f"{KWARGS}.scheduler.token_budgt"]
    assert lines[1] == f"{KWARGS}.pruning.threshold: Input should be less than or equal to 1, got float 2.0"


def test_what_the_loader_refuses_the_engine_refuses_too(tmp_path):
    # The loader builds the engine's own configs: no refusal of its own making.
    for kwargs in ({"cache": {"retreival": "cluster"}}, {"cache": {"cluster": {"variance_ratio": 700.0}}},
                   {"cache": {"budget_ratio": "high"}}, {"pruning": {"threshold": 2.0}}):
        with pytest.raises((TypeError, ValueError)):
            EngineConfig(**copy.deepcopy(kwargs))
        with pytest.raises(LaunchError, match=KWARGS.replace(".", r"\.")):
            load_config(_config(tmp_path, lambda c: _engine(c).update(kwargs)))


def test_api_keys_are_not_echoed(tmp_path):
    secret = "short-key1"
    (line,) = _refusal(_config(tmp_path, lambda c: c["app"].update(auth={"keys": {secret: "tenant"}})))
    assert line.startswith("app.auth.keys: an API key is at least 16") and secret not in line


def test_another_factory_keeps_its_own_kwargs(tmp_path):
    path = _config(tmp_path, lambda c: c["app"]["runtime"]["engine"].update(factory=FACTORY,
                                                                            kwargs={"frame_delay_s": 0.1}))
    assert load_config(path).app.runtime.engine.kwargs == {"frame_delay_s": 0.1}


def test_the_cli_refuses_with_one_line_and_exit_2_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(command, "_serve", lambda *a: pytest.fail("Ray would start"))
    # the suite's other tests may share a running Ray: what counts is that this command never starts one
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called"))
    path = _config(tmp_path, lambda c: _engine(c)["cache"].update(retreival="cluster"))
    assert main(["serve", "--config", path]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # refused before the start line, and before Ray
    assert out.err.startswith(f"mosaic-ray serve: config {path}: {KWARGS}.cache.retreival: unknown field")
    assert out.err.count("\n") == 1


def test_the_cli_process_exits_2_within_seconds_without_importing_ray(tmp_path):
    path = _config(tmp_path, lambda c: _engine(c)["cache"].update(cluster={"variance_ratio": 700.0}))
    probe = ("import sys; from mosaic_ray.cli import main; rc = main(['serve', '--config', sys.argv[1]]); "
             "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=60, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and done.stdout == "no ray\n", (done.stdout, done.stderr)
    assert done.stderr == (f"mosaic-ray serve: config {path}: {KWARGS}.cache.cluster.variance_ratio: Input should be "
                           "less than or equal to 100, got float 700.0\n")
    assert elapsed < 20, elapsed  # the configs import no torch; the old failure came after 23 s


def test_a_file_that_is_no_mapping_is_one_line(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- ray\n- http\n")
    assert main(["serve", "--config", str(path), "--port", "9000"]) == 2  # a flag applied to no mapping
    assert capsys.readouterr().err == (f"mosaic-ray serve: config {path}: expected a mapping of LaunchConfig "
                                       "fields, got list\n")
