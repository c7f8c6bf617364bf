"""`mosaic-ray serve [--model NAME_OR_DIR] [--config FILE]`: start (or join) Ray, run the Serve
app, wait for Ctrl-C / SIGTERM, then take the app down.

The config is a `LaunchConfig` (`serve/config.py`): a YAML path, or the name of one packaged with
mosaic_ray (`local`, `local_tiny`, ...: `mosaic_ray/cluster_configs/`, found through
importlib.resources, so `serve` works from any directory). The default, `local`, runs the real
small stack (dino-smollm2) on two CPU shards. Flags override a few fields for quick runs:
`--model`, `--port`, `--host`, `--num-shards`, `--engine package.module:factory`, `--address`,
`--log-dir`.

Before Ray starts, it says which model runs, where its weights come from and what it caches,
and locks the frame-log directory (`runtime/durability/log_dir_lock.py`): a second server on the same
directory refuses to start. With a private cluster and no `durability.root`, the directory is
per server: `$MOSAIC_RAY_LOG_DIR` (else `~/.mosaic_ray/log`) `/port-<http.port>/<runtime name>`.
A private cluster runs with Ray's token authentication, named explicitly (RAY_AUTH_MODE=token
unless the user set RAY_AUTH_MODE), so Ray starts it without its auth warning
(`private_cluster_env`). With a private cluster, `http.host:port` is the header guard's
(`header_guard.py`: 408 for a head not complete in `http.header_timeout_s`), in front of Serve's
proxy on a loopback port.

Stopping (SIGTERM or Ctrl-C), in this order:
1. drain: the router refuses new streams and every shard refuses new requests (503 +
   Retry-After), finishes the ones it admitted (up to `drain_timeout_s`) and fsyncs its frame logs;
2. with a private cluster (no `ray.address`) Ray shuts down with everything in it; on a shared
   cluster the app is deleted and the runtime's actors are killed, freeing their GPUs.
The frame logs stay: started again with the same config (same log root), the runtime finds the
streams there and rebuilds them (docs/reliability.md). Exit status 0 after a clean stop; 2 when
the config, the model or the log directory is refused before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, MutableMapping

import yaml
from pydantic import ValidationError

from mosaic_ray.serve.config import LaunchConfig
from mosaic_ray.serve.config_errors import validation_lines
from mosaic_ray.serve.header_guard import GuardLimits, HeaderGuard, free_loopback_port, run_in_thread

# The packaged config a bare `mosaic-ray serve` runs: the real small stack on the CPU (issue 18:
# a newcomer's first server answers with real weights, not the tiny random model).
DEFAULT_CONFIG = "local"
PACKAGED = "mosaic_ray.cluster_configs"


class LaunchError(Exception):
    """Refused before anything started: the message is for the user, one line per problem, no
    traceback."""


# Packaged files that are not LaunchConfigs (a Serve config file, a cluster launcher file).
NOT_LAUNCH_CONFIGS = {"serve", "multi_node_cluster"}


def packaged_configs() -> list[str]:
    """Names of the LaunchConfigs shipped with mosaic_ray, without `.yaml`."""
    files = importlib.resources.files(PACKAGED)
    names = (p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))
    return sorted(n for n in names if n not in NOT_LAUNCH_CONFIGS)


def resolve_config(name_or_path: str) -> Path:
    """A config file: `name_or_path` when it is a file, else a packaged config of that name
    (`local` or `local.yaml`). LaunchError naming both when neither exists."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if "/" not in name_or_path:
        stem = name_or_path.removesuffix(".yaml")
        packaged = importlib.resources.files(PACKAGED) / f"{stem}.yaml"
        if packaged.is_file():
            return Path(str(packaged))
    raise LaunchError(f"no config file {name_or_path!r} (not a file here, nor a packaged config: "
                      f"{', '.join(packaged_configs())})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="the model to serve: dino-smollm2 (real small weights), tiny | 7b-shape (random init), or a "
                        "local transformers directory (default: the config's; `local` runs dino-smollm2)")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE_OR_NAME",
                   help="a LaunchConfig YAML file, or a packaged one: " + ", ".join(packaged_configs()))
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto', 'ray://host:10001') "
                   "(default: the config's; `local` starts a private one)")
    p.add_argument("--host", default=None, help="HTTP host to listen on (default: the config's; `local`: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's; `local`: 8000)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="shard actors, one GPU each (default: the config's; `local`: 2 on logical GPUs)")
    p.add_argument("--engine", default=None, help="engine factory 'package.module:attr' (default: the config's)")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="frame-log root, one server per directory (default: the config's durability.root, else "
                        "$MOSAIC_RAY_LOG_DIR or ~/.mosaic_ray/log, then port-<port>)")


def load_config(path: str | Path, args: argparse.Namespace | None = None) -> LaunchConfig:
    """The LaunchConfig of `path` (a file or a packaged name) with the flags of `args` applied and,
    for a private cluster without `durability.root`, the per-server log root filled in. Nothing
    of Ray is imported: a config that cannot work is a LaunchError here (`_validated`)."""
    try:
        with open(resolve_config(str(path))) as f:
            raw: dict[str, Any] = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"config {path}: not YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise LaunchError(f"config {path}: expected a mapping of LaunchConfig fields, got {type(raw).__name__}")
    if args is not None:
        _override(raw, ("ray", "address"), args.address)
        _override(raw, ("http", "host"), args.host)
        _override(raw, ("http", "port"), args.port)
        _override(raw, ("app", "runtime", "num_shards"), args.num_shards)
        _override(raw, ("app", "runtime", "engine", "factory"), args.engine)
        _override(raw, ("app", "runtime", "engine", "kwargs", "model"), getattr(args, "model", None))
        _override(raw, ("app", "runtime", "durability", "root"), getattr(args, "log_dir", None))
    cfg = _validated(raw, path)
    return cfg if cfg.ray.address is not None else _per_server_log_root(cfg)


def _validated(raw: dict[str, Any], path: str | Path) -> LaunchConfig:
    """`LaunchConfig(**raw)`, the real engine's kwargs validated too (as a shard builds them,
    weights not loaded). LaunchError with every problem found, one line each, 'config PATH:
    dotted.path.in.the.yaml: what is wrong' (`config_errors.py`)."""
    try:
        cfg, errors = LaunchConfig(**raw), []
    except ValidationError as err:
        cfg, errors = None, validation_lines(err, LaunchConfig)
    if errors:
        raise LaunchError("\n".join(f"config {path}: {line}" for line in errors))
    return cfg


def _per_server_log_root(cfg: LaunchConfig) -> LaunchConfig:
    """Without `durability.root`, a private cluster's logs go to `<base>/port-<http.port>`: two
    servers on one host (they cannot share a port) never meet in a directory, and a restart with
    the same config finds its streams again. A shared cluster keeps the runtime's own default
    (its nodes resolve it), and a root the config names is kept as given."""
    from mosaic_ray.runtime.durability.frame_log_stores import DEFAULT_LOG_DIR, LOG_DIR_ENV

    durability = cfg.app.runtime.durability
    if durability.root is not None:
        return cfg
    base = Path(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR).expanduser()
    durability = durability.model_copy(update={"root": str(base / f"port-{cfg.http.port}")})
    runtime = cfg.app.runtime.model_copy(update={"durability": durability})
    return cfg.model_copy(update={"app": cfg.app.model_copy(update={"runtime": runtime})})


def _override(raw: dict, path: tuple[str, ...], value: Any) -> None:
    if value is None:
        return
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _model_line(cfg: LaunchConfig) -> str:
    """What the shards will load, said before they load it; LaunchError for a name that is neither
    a model nor a directory (only the real engine's kwargs name a model)."""
    from mosaic_ray.model.provenance import describe_weights
    from mosaic_ray.runtime.config import DEFAULT_ENGINE_FACTORY

    engine = cfg.app.runtime.engine
    if engine.factory != DEFAULT_ENGINE_FACTORY:
        return f"engine {engine.factory} (its own model)"
    model = engine.kwargs.get("model", "tiny")
    try:
        return describe_weights(str(model))
    except ValueError as err:
        raise LaunchError(str(err)) from None


def _lock_log_dir(cfg: LaunchConfig, url: str):
    """The held LogDirLock of the runtime's frame-log directory, or None where this process cannot
    see that directory (a shared cluster with no explicit root: its nodes resolve it)."""
    from mosaic_ray.runtime.durability.frame_log_stores import log_root
    from mosaic_ray.runtime.durability.log_dir_lock import LogDirInUseError, LogDirLock

    durability = cfg.app.runtime.durability
    if not durability.enabled or durability.store != "disk":
        return None
    if cfg.ray.address is not None and durability.root is None:
        return None
    try:
        return LogDirLock.acquire(log_root(durability, cfg.app.runtime.name), owner=url)
    except LogDirInUseError as err:
        raise LaunchError(str(err)) from None


# Ray's token authentication (Ray >= 2.60). A private cluster is not a loopback-only one: its GCS,
# raylets and workers listen on the node's address (e.g. 192.0.2.2; `http.host: 127.0.0.1` binds
# Serve's HTTP proxy only), so anyone who reaches this machine could run code in it without a
# token. Ray already starts a new local cluster with token auth when RAY_AUTH_MODE is unset, and
# says so on every start ("Token authentication is enabled for this Ray cluster. Set
# RAY_AUTH_MODE=disabled to opt out...", `ray/_private/authentication/authentication_token_setup.py`).
# Naming the same mode explicitly is Ray's supported way to choose it: same security, no warning.
# Disabling it instead would silence the warning by opening the cluster, so we never do: only the
# user may (RAY_AUTH_MODE=disabled, as the tests' command does), and that choice is kept. A
# cluster we join is left alone: Ray does not warn there, and its mode is the cluster's to say.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
PRIVATE_CLUSTER_ENV = {
    AUTH_MODE_ENV: "token",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting
}


def private_cluster_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Give `environ` the settings of a private cluster (`PRIVATE_CLUSTER_ENV`) where it has none;
    return those it added. Invariants: a variable already set (to anything, even empty) is never
    changed, so a user's RAY_AUTH_MODE wins; the auth mode added is always `token`, never
    `disabled`. Only for a cluster mosaic-ray starts itself: one it joins (`ray.address`) has its
    own mode, which the joining process must match, so nothing is set for it."""
    added = {key: value for key, value in PRIVATE_CLUSTER_ENV.items() if key not in environ}
    environ.update(added)
    return added


def _reload_ray_config() -> None:
    """Ray caches RAY_AUTH_MODE in its RayConfig when `ray` is first imported (the config checks
    above already imported it): read the environment again, as Ray's own `_enable_token_auth`
    does, so this driver and the cluster processes it starts (they inherit the environment) agree
    on the mode, and ray.init creates the token (~/.ray/auth_token) where none exists yet."""
    from ray._raylet import Config

    Config.initialize("")


def _header_guard(cfg: LaunchConfig) -> HeaderGuard | None:
    """The guard that bounds header reads (`header_guard.py`) at cfg.http's address, in front of
    Serve's proxy on a free loopback port; None when off or on a joined cluster (its proxy is the
    cluster's: a slow-drip head there is for a fronting proxy to cut)."""
    http = cfg.http
    if http.header_timeout_s == 0:
        return None
    if cfg.ray.address is not None:
        print("mosaic-ray: header timeouts are off on a joined cluster (its HTTP proxy is the cluster's)", flush=True)
        return None
    limits = GuardLimits(http.header_timeout_s, http.idle_timeout_s, http.max_header_bytes)
    return HeaderGuard(http.host, http.port, ("127.0.0.1", free_loopback_port()), limits)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args)
        url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
        print(f"mosaic-ray: {_model_line(cfg)}", flush=True)
        lock = _lock_log_dir(cfg, url)
    except LaunchError as err:
        for line in str(err).splitlines():
            print(f"mosaic-ray serve: {line}", file=sys.stderr, flush=True)
        return 2
    try:
        return _serve(cfg, url, lock)
    finally:
        if lock is not None:
            lock.release()


def _serve(cfg: LaunchConfig, url: str, lock) -> int:
    import ray
    from ray import serve

    from mosaic_ray.runtime.bootstrap import drain_runtime, shutdown_runtime
    from mosaic_ray.serve.app import build_app

    if cfg.ray.address is None and AUTH_MODE_ENV in private_cluster_env(os.environ):
        _reload_ray_config()
    ray.init(
        address=cfg.ray.address or "local",
        num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
        num_gpus=cfg.ray.num_gpus if cfg.ray.address is None else None,
        object_store_memory=cfg.ray.object_store_memory if cfg.ray.address is None else None,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env=cfg.ray.runtime_env or None,
    )
    # Right after ray.init (which installs Ray's own SIGTERM handler): a stop asked while Serve
    # starts is kept, and honoured once it has started.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    guard = _header_guard(cfg)
    try:  # listening first: a port in use is said before Serve starts
        stop_guard = run_in_thread(guard) if guard is not None else None
    except OSError as exc:
        print(f"mosaic-ray serve: cannot listen at {cfg.http.host}:{cfg.http.port}: {exc.strerror or exc}",
              file=sys.stderr, flush=True)
        ray.shutdown() if cfg.ray.address is None else None
        return 2
    proxy = ("127.0.0.1", guard.upstream[1]) if guard is not None else (cfg.http.host, cfg.http.port)
    serve.start(http_options={"host": proxy[0], "port": proxy[1]})
    serve.run(build_app(cfg.app.model_dump()), name=cfg.app_name, route_prefix=cfg.route_prefix)
    logs = f"; frame logs in {lock.directory}" if lock is not None else ""
    print(f"mosaic-ray: serving {cfg.app.runtime.num_shards} shard(s) at {url}{logs}  (Ctrl-C to stop)", flush=True)

    stop.wait()
    print("mosaic-ray: stopping: draining the shards", flush=True)
    try:
        drained = asyncio.run(drain_runtime(cfg.app.runtime, cfg.drain_timeout_s))
        unfinished = sum(d.get("unfinished", 0) for d in drained.values())
        print(f"mosaic-ray: drained {len(drained)} shard(s), {unfinished} request(s) cut off", flush=True)
    except Exception as exc:  # still stop: acknowledged frames are in the logs whatever happens here
        print(f"mosaic-ray: drain failed ({type(exc).__name__}: {exc})", flush=True)
    if stop_guard is not None:  # after the drain: its answers (and its 503s) go through the guard
        stop_guard()
    if cfg.ray.address is None:
        ray.shutdown()  # the private cluster goes, and the app and the runtime with it
    else:
        # On a shared cluster, free the GPUs too: the router and shards are detached actors.
        # Their streams stay in the frame logs, for the next start.
        serve.delete(cfg.app_name)
        shutdown_runtime(cfg.app.runtime)
    return 0
