"""Reading server-sent events: lines in, (event name, JSON data) out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


async def iter_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """Yield (event, data) per event; `event` is "message" when unnamed; data is parsed JSON
    (or the raw text when it is not JSON, as OpenAI's final "[DONE]")."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield event, payload
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
