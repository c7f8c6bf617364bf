"""The runtime of a Serve application ends with the application.

The router and the shards are detached actors (a restarted router must find its shards, and every
ingress replica finds them by name: `runtime/bootstrap.py`), so Ray does not stop them with the
replicas that started them. Serve calls each replica's `__del__` when it stops it; there
`release_with_app` asks Serve whether the application itself is going (`serve delete`,
`serve shutdown`, `serve.delete`, `serve.shutdown`: its status is DELETING, or Serve no longer
knows it) and only then drains the runtime and kills the router and every shard, which frees their
GPUs. A replica stopped while the application stays (scale-down, rolling update, failed health
check) leaves the runtime to the others. Several replicas releasing at once is harmless: killing
an actor that is gone is a no-op. Streams' frame logs stay, as after `shutdown_runtime`.
"""

from __future__ import annotations

import asyncio
import logging

from mosaic_ray.runtime.bootstrap import drain_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig

log = logging.getLogger(__name__)

# Drain before the kill: in-flight requests of the other replicas finish, frame logs are fsynced.
# Well inside Serve's graceful_shutdown_timeout_s (20 s by default), after which it kills the replica.
DRAIN_TIMEOUT_S = 8.0


def _app_going(app_name: str) -> bool:
    """True when Serve is deleting application `app_name`, or no longer knows it (no controller)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    return app is None or app.status == "DELETING"


async def release_with_app(config: RuntimeConfig, app_name: str) -> bool:
    """Drain and kill the runtime of `config` when application `app_name` is going; returns whether
    it did. Never raises: a replica's teardown must not fail on it (an unanswered status keeps the
    runtime, the safe side)."""
    try:
        if not await asyncio.to_thread(_app_going, app_name):
            return False
    except Exception:
        log.exception("could not ask Serve whether app %s is going; its runtime stays", app_name)
        return False
    try:
        await drain_runtime(config, DRAIN_TIMEOUT_S)
    except Exception as exc:  # killed anyway: acknowledged frames are in the logs
        log.warning("drain of runtime %s failed (%s: %s)", config.name, type(exc).__name__, exc)
    await asyncio.to_thread(shutdown_runtime, config)
    return True
