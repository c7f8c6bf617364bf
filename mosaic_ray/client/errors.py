"""The error a client call raises when the server refuses it (or never answers)."""

from __future__ import annotations


class MosaicAPIError(Exception):
    """The server answered `status` with `{"error": {"code", "message"}}` (or gave up retrying)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
