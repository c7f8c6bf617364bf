"""Python clients of the mosaic_ray HTTP API (`client.py`) and its realtime WebSocket (`realtime.py`)."""

from mosaic_ray.client.client import AsyncMosaicClient, MosaicClient, PushResult
from mosaic_ray.client.errors import MosaicAPIError
from mosaic_ray.client.realtime import RealtimeSession
from mosaic_ray.client.retry import RetryPolicy

__all__ = ["AsyncMosaicClient", "MosaicAPIError", "MosaicClient", "PushResult", "RealtimeSession", "RetryPolicy"]
