"""Run every kernel benchmark in one process and write their JSON plus a summary.

    python scaling_bench/kernels/bench_all.py --out docs/results/kernels            # full, ~5 min on an H100
    python scaling_bench/kernels/bench_all.py --out docs/results/kernels --quick    # ~2 min
    TRITON_INTERPRET=1 python scaling_bench/kernels/bench_all.py --smoke --out /tmp/k   # CPU: code paths only

One benchmark failing (e.g. UVA refused) is recorded in bench_all.json and the others still run.
The summary puts each op's headline next to the goal it serves.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: scaling_bench, mosaic_ray

from scaling_bench.kernels import common as bc  # noqa: E402

# modules of scaling_bench.kernels; each writes NAME.json (benchmark_<module>, as in docs/results)
BENCHMARKS = ["gather_rows", "assign_nearest"]


def _best(rows: list[dict[str, Any]], key: str, **match: Any) -> dict[str, Any] | None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get(key) is not None
          and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r[key]) if ok else None


def summarize(name: str, payload: dict[str, Any]) -> list[str]:
    rows = payload.get("results", [])
    lines = []
    if name == "gather_rows":
        for D in sorted({r.get("D") for r in rows if r.get("D")}):
            big = max((r["B"] for r in rows if r.get("D") == D), default=None)
            for method in ("uva_kernel", "uva_kernel_best", "uva_torch_index", "cpu_index_copy"):
                r = _best(rows, "gbps", D=D, B=big, pattern="random", method=method)
                if r:
                    lines.append(f"gather_rows D={D} B={big} {method:16s} {r['gbps']:6.1f} GB/s = {r['frac_of_peak']:.2f} of peak")
    elif name == "assign_nearest":
        keys = [k for k in ("G", "Q", "n", "C") if rows and k in rows[0]]
        cases = sorted({tuple(r.get(k) for k in keys) for r in rows})
        for case in cases[-2:]:
            sel = {k: v for k, v in zip(keys, case)}
            parts = []
            for r in rows:
                if all(r.get(k) == v for k, v in sel.items()) and r.get("us"):
                    parts.append(f"{r['method']} {r['us']:.1f} us")
            lines.append(f"{payload.get('op')} {sel}: " + ", ".join(parts))
    if payload.get("best_config"):
        lines.append(f"{payload.get('op')} best kernel config: {payload['best_config']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names (e.g. gather_rows)")
    args = p.parse_args(argv)

    names = BENCHMARKS if not args.only else [n.removeprefix("benchmark_") for n in args.only]
    summary: dict[str, Any] = {"env": bc.environment(), "benchmarks": {}}
    lines: list[str] = []
    for name in names:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            module = importlib.import_module(f"scaling_bench.kernels.{name}")
            payload = module.run(args)
            entry["status"] = "ok"
            errors = [r for r in payload.get("results", []) + payload.get("sweep", []) if r.get("status") not in ("ok", None)
                      and not str(r.get("status")).startswith("skipped")]
            entry["problems"] = [{k: r.get(k) for k in ("method", "status", "error") if k in r} for r in errors]
            entry["best_config"] = payload.get("best_config")
            lines += summarize(name, payload)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - one benchmark failing must not hide the others
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()
            print(entry["traceback"])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        summary["benchmarks"][f"benchmark_{name}"] = entry  # the key of earlier results
    summary["fallbacks"] = bc.fallbacks()
    summary["summary"] = lines

    print(f"\n== summary ({summary['env'].get('device')}, triton {summary['env'].get('triton')}, torch {summary['env'].get('torch')})")
    for line in lines:
        print("  " + line)
    for name, entry in summary["benchmarks"].items():
        state = entry["status"] + (f" ({len(entry.get('problems', []))} problem rows)" if entry.get("problems") else "")
        print(f"  {name}: {state} in {entry['seconds']} s" + (f" - {entry.get('error')}" if entry.get("error") else ""))
    if summary["fallbacks"]:
        print(f"  FALLBACKS to torch (kernel could not run): {summary['fallbacks']}")
    bc.write_json(args.out, "bench_all", summary)


if __name__ == "__main__":
    main()
