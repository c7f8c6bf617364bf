"""Outputs of a scaling benchmark: JSON + markdown table (+ the script's PNG) under --out, and the
machine they came from (named beside every figure)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    try:
        import torch

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        card = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {"device": card or f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "gpu": card is not None, "host": platform.node(), "python": platform.python_version(), "commit": commit}


def gpu_count() -> int:
    """CUDA devices this process sees (0 without CUDA or torch)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def done(out: str | Path, name: str, table: list[str], wall_s: float) -> None:
    """A scaling script's last words: its table and where the files went (an absolute path)."""
    print("\n".join(table))
    print(f"wrote {Path(out).resolve()}/{name}.{{json,md,png}} in {wall_s:.0f} s")


def write_json(out: str | Path, name: str, result: dict[str, Any]) -> Path:
    """`out/name.json` (the folder made when missing); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return out


def show_json(out: str | Path | None, name: str, result: dict[str, Any]) -> None:
    """Print `result` as JSON, and write it to `out/name.json` when `out` is given (its absolute
    path printed last)."""
    print(json.dumps(result, indent=1))
    if out:
        print(f"wrote {write_json(out, name, result).resolve() / f'{name}.json'}")


def write(out: str | Path, name: str, result: dict[str, Any], table: list[str]) -> Path:
    out = write_json(out, name, result)
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    return out


def publish(out: str | Path, name: str, result: dict[str, Any], table: list[str], plot=None) -> list[str]:
    """`write`, then `plot(result["rows"], png path)` where matplotlib is installed; returns the table.
    Scripts call it after every measured part, so a run cut off by a time limit keeps what it got."""
    path = write(out, name, result, table)
    if plot is not None:
        try:
            plot(result["rows"], path / f"{name}.png")
        except ImportError:
            print("matplotlib missing: no plot (re-render later with --from-json)")
    return table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def json_default(o):
    """json.dumps fallback: tensors as lists, non-finite floats as null."""
    import math

    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o))


def bkey(budget: float) -> str:
    """JSON key of a budget share (0.05 -> "0.05")."""
    return f"{budget:g}"
