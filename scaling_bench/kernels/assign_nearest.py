"""Benchmark assign_nearest on a GPU: fused distance + argmin vs torch (materialized [G, n, C]).

Ingest shape: n new keys per group (one 196-token frame, or a batch of frames), G = streams x KV
heads of one layer, C live centroids, D = 128, bf16. Methods:
  kernel        assign_nearest(backend="triton")
  torch_bmm     bf16 bmm + norms + masked min in torch (materializes [G, n, C] fp32)
  reference     assign_nearest_reference (fp32 bmm): what the CPU path runs
Reports us per call, TFLOP/s of the 2*G*n*C*D dot work, and the share of rows where the kernel's
argmin equals the fp32 reference's (1.0 up to exact near-ties).

Run on the GPU machine:  python scaling_bench/kernels/assign_nearest.py --out docs/results/kernels
CPU smoke test:  TRITON_INTERPRET=1 python scaling_bench/kernels/assign_nearest.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.kernels.assign_nearest import assign_nearest, assign_nearest_reference  # noqa: E402
from scaling_bench.harness.timing import time_op  # noqa: E402
from scaling_bench.kernels import common as bc  # noqa: E402

NAME = "benchmark_assign_nearest"
COLUMNS = ["G", "n", "C", "method", "us", "latency_us", "tflops", "same_idx", "status"]


def run(args) -> dict[str, Any]:
    device = bc.bench_device(args.smoke)
    dtype = torch.bfloat16
    D = 64 if args.smoke else 128
    if args.smoke:
        cases = [(2, 20, 40)]
        sweep_n, sweep_c, sweep_w = [16], [16, 32], [4]
    elif args.quick:
        cases = [(4, 196, 2048), (64, 196, 2048)]
        sweep_n, sweep_c, sweep_w = [32, 64], [32, 64], [4, 8]
    else:
        cases = [(4, 196, 256), (4, 196, 2048), (4, 196, 8192), (64, 196, 2048), (64, 1024, 8192), (4, 4096, 8192)]
        sweep_n, sweep_c, sweep_w = [64, 128], [32, 64, 128], [4, 8]
    budget_s = 0.05 if args.smoke else 0.2
    gen = torch.Generator().manual_seed(0)

    def inputs(G, n, C):
        x = torch.randn((G, n, D), generator=gen).to(dtype).to(device)
        c = torch.randn((G, C, D), generator=gen).to(dtype).to(device)
        k = torch.full((G,), C, dtype=torch.int64).to(device)
        return x, c, k

    results: list[dict[str, Any]] = []
    for G, n, C in cases:
        x, c, k = inputs(G, n, C)
        flops = 2.0 * G * n * C * D
        _, ref_idx = assign_nearest_reference(x, c, k)
        live = torch.arange(C, device=device) < k[:, None]

        def torch_bmm():
            d2 = (
                (x.float() ** 2).sum(-1)[:, :, None]
                - 2.0 * torch.bmm(x, c.transpose(1, 2)).float()
                + (c.float() ** 2).sum(-1)[:, None, :]
            ).masked_fill_(~live[:, None, :], float("inf"))
            return d2.min(dim=-1)

        for name, fn in (
            ("kernel", lambda: assign_nearest(x, c, k, backend="triton")),
            ("torch_bmm", torch_bmm),
            ("reference", lambda: assign_nearest_reference(x, c, k)),
        ):
            rec: dict[str, Any] = {"G": G, "n": n, "C": C, "D": D, "method": name}

            def measure(fn=fn):
                _, idx = fn()
                res: dict[str, Any] = {"same_idx": float((idx == ref_idx).float().mean())}
                res.update(time_op(fn, device, budget_s=budget_s))
                res["tflops"] = flops / (res["us"] * 1e-6) / 1e12
                return res

            results.append(bc.attempt(rec, measure))

    G, n, C = cases[-1]
    x, c, k = inputs(G, n, C)
    sweep = []
    for bn in sweep_n:
        for bcn in sweep_c:
            for nw in sweep_w:
                rec = {"G": G, "n": n, "C": C, "block_n": bn, "block_c": bcn, "num_warps": nw}

                def fn(bn=bn, bcn=bcn, nw=nw):
                    assign_nearest(x, c, k, backend="triton", block_n=bn, block_c=bcn, num_warps=nw)

                r = bc.attempt(rec, lambda fn=fn: time_op(fn, device, budget_s=budget_s))
                if r.get("us"):
                    r["tflops"] = 2.0 * G * n * C * D / (r["us"] * 1e-6) / 1e12
                sweep.append(r)

    bc.print_table(f"assign_nearest  D={D} {dtype}", results, COLUMNS)
    bc.print_table("assign_nearest kernel tile sweep", sweep,
                   ["G", "n", "C", "block_n", "block_c", "num_warps", "us", "tflops", "status"])
    ok = [r for r in sweep if r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    payload = {
        "op": "assign_nearest",
        "env": bc.environment(),
        "shape": {"D": D, "dtype": str(dtype)},
        "results": results,
        "sweep": sweep,
        "best_config": {k_: best[k_] for k_ in ("block_n", "block_c", "num_warps", "us")} if best else None,
    }
    return bc.finish(args.out, NAME, payload)


def main(argv: list[str] | None = None) -> None:
    run(bc.parse_args(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
