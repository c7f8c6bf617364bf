"""OpenAIRouteHost: what `OpenAIRoutes` uses of the ingress that owns it.

`MosaicIngress` (app.py) satisfies it structurally; the routes depend on this protocol instead of
on app.py, so app.py can build the routes without the two modules importing each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mosaic_ray.serve.auth import Caller
    from mosaic_ray.serve.directory import StreamDirectory
    from mosaic_ray.serve.frames import FrameParser


class OpenAIRouteHost(Protocol):
    _dir: StreamDirectory  # the runtime's streams: calls to the shard that owns one
    _parser: FrameParser  # the frames route's checks, reused for a chat message's images

    def _sid(self, who: Caller, stream_id: str) -> str:
        """The runtime's id of the caller's stream (404 for a name that cannot be one)."""
        ...

    def _ask(self, params: dict[str, Any]) -> dict[str, Any]:
        """A question's engine parameters, checked as on every path."""
        ...

    def _charged(self, who: Caller, frames: int, nbytes: int,
                 question_tokens: int = 0) -> AbstractAsyncContextManager[None]:
        """The tenant's rates charged for the block, refunded when it fails."""
        ...

    async def _start_answer(self, stream_id: str, params: dict[str, Any],
                            with_end: bool = False) -> tuple[AsyncIterator[Any], float]:
        """A started question's items and its time to first item."""
        ...

    def _error_json_for(self, who: Caller) -> Callable[[BaseException], dict[str, Any]]:
        """The error body maker of a streamed answer for this caller."""
        ...
