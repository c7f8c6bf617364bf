"""Benchmark select_budget on a GPU: the one-launch threshold-search kernel vs torch sort + cumsum.

G groups (streams x KV heads of one layer) of C clusters with sizes 1..64 tokens (20 % padding
slots at -inf), budget = 10 % of a group's tokens. Methods:
  kernel      select_budget(backend="triton")
  reference   select_budget_reference: stable sort, gather, cumsum, compare, scatter (torch)
Both must give the same mask; the table says so. The kernel exists to replace ~6 launches on the
query's critical path with one; if `reference` is as fast on the H100, keep the torch version.

Run on the GPU machine:  python -m mosaic_ray.kernels.benchmark_select_budget --out docs/results/kernels
CPU smoke test:  TRITON_INTERPRET=1 python -m mosaic_ray.kernels.benchmark_select_budget --smoke
"""

from __future__ import annotations

from typing import Any

import torch

from mosaic_ray.kernels import benchmark_common as bc
from mosaic_ray.kernels.select_budget import select_budget, select_budget_reference

NAME = "benchmark_select_budget"
COLUMNS = ["G", "C", "budget", "method", "us", "latency_us", "same_mask", "status"]
BUDGET_FRACTION = 0.10


def run(args) -> dict[str, Any]:
    device = bc.bench_device(args.smoke)
    if args.smoke:
        cases = [(2, 50)]
        sweep_c, sweep_w = [16, 64], [4]
    elif args.quick:
        cases = [(4, 1024), (64, 8192)]
        sweep_c, sweep_w = [128, 256, 1024], [4, 8]
    else:
        cases = [(4, 1024), (4, 8192), (64, 1024), (64, 8192), (256, 8192), (64, 32768)]
        sweep_c, sweep_w = [128, 256, 512, 1024], [4, 8]
    budget_s = 0.05 if args.smoke else 0.2
    gen = torch.Generator().manual_seed(0)

    def inputs(G, C):
        scores = torch.randn((G, C), generator=gen)
        scores[torch.rand((G, C), generator=gen) < 0.2] = float("-inf")
        sizes = torch.randint(1, 65, (G, C), generator=gen, dtype=torch.int64)
        budget = int(BUDGET_FRACTION * C * 32.5)
        return scores.to(device), sizes.to(device), budget

    results: list[dict[str, Any]] = []
    for G, C in cases:
        scores, sizes, budget = inputs(G, C)
        ref = select_budget_reference(scores, sizes, budget)
        for name, fn in (
            ("kernel", lambda: select_budget(scores, sizes, budget, backend="triton")),
            ("reference", lambda: select_budget_reference(scores, sizes, budget)),
        ):
            rec: dict[str, Any] = {"G": G, "C": C, "budget": budget, "method": name}

            def measure(fn=fn):
                got = fn()
                same = bool(torch.equal(got.mask, ref.mask) and torch.equal(got.tokens, ref.tokens))
                res: dict[str, Any] = {"same_mask": same}
                if not same:
                    res["status"] = "mismatch"
                res.update(bc.time_op(fn, device, budget_s=budget_s))
                return res

            results.append(bc.attempt(rec, measure))

    G, C = cases[-1]
    scores, sizes, budget = inputs(G, C)
    sweep = []
    for bcn in sweep_c:
        for nw in sweep_w:
            rec = {"G": G, "C": C, "block_c": bcn, "num_warps": nw}

            def fn(bcn=bcn, nw=nw):
                select_budget(scores, sizes, budget, backend="triton", block_c=bcn, num_warps=nw)

            sweep.append(bc.attempt(rec, lambda fn=fn: bc.time_op(fn, device, budget_s=budget_s)))

    bc.print_table(f"select_budget  budget {BUDGET_FRACTION:.0%} of tokens, 20 % padding", results, COLUMNS)
    bc.print_table("select_budget kernel sweep", sweep, ["G", "C", "block_c", "num_warps", "us", "latency_us", "status"])
    ok = [r for r in sweep if r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    payload = {
        "op": "select_budget",
        "env": bc.environment(),
        "results": results,
        "sweep": sweep,
        "best_config": {k: best[k] for k in ("block_c", "num_warps", "us")} if best else None,
        "fallbacks": bc.fallbacks(),
    }
    bc.write_json(args.out, NAME, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    run(bc.parse_args(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
