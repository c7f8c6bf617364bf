"""ConfigModel: the base of every pydantic configuration model (runtime, serve, realtime specs).

Invariants: an unknown field is an error (a misspelt key never passes silently as a default), and a
built config is immutable (`model_copy(update=...)` makes a changed one), so a spec handed to a Ray
actor is the spec it was validated as.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that hold plain data (a dict, to pydantic) which the model's own validator checks as
    # another model: `EngineSpec.kwargs` of the real engine is an `EngineConfig`. What walks the
    # tree by its types (`config_docs.py`, `serve/config_errors.py`) reads such a field as that model.
    plain_models: ClassVar[dict[str, type[BaseModel]]] = {}
