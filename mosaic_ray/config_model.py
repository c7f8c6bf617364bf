"""ConfigModel: the base of every pydantic configuration model (runtime, serve, realtime specs).

Invariants: an unknown field is an error (a misspelt key never passes silently as a default), and a
built config is immutable (`model_copy(update=...)` makes a changed one), so a spec handed to a Ray
actor is the spec it was validated as.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
