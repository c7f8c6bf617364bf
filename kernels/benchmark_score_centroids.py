"""Benchmark score_centroids on a GPU: one launch for all groups vs torch.

G = streams x KV heads (one layer), C centroid slots per group (padded; 80 % live), Q queries per
group, D = 128, bf16. Methods:
  kernel       score_centroids(backend="triton")
  torch_bmm    torch.bmm in bf16 (fp32 accumulate) + float + masked_fill: the fast torch way
  reference    score_centroids_reference (fp32 einsum): what the CPU path runs
Reports us per call and the effective bandwidth of the live centroid bytes vs HBM (~3 TB/s on an
H100, FACTS.md): scoring is bandwidth-bound at small Q.

Run on the GPU machine:  python -m mosaic_ray.kernels.benchmark_score_centroids --out docs/results/kernels
CPU smoke test:  TRITON_INTERPRET=1 python -m mosaic_ray.kernels.benchmark_score_centroids --smoke
"""

from __future__ import annotations

from typing import Any

import torch

from mosaic_ray.kernels import benchmark_common as bc
from mosaic_ray.kernels.score_centroids import score_centroids, score_centroids_reference

NAME = "benchmark_score_centroids"
COLUMNS = ["G", "Q", "C", "method", "us", "latency_us", "gbps", "frac_of_peak", "max_err", "status"]
LIVE_FRACTION = 0.8


def run(args) -> dict[str, Any]:
    device = bc.bench_device(args.smoke)
    dtype = torch.bfloat16
    D = 64 if args.smoke else 128
    if args.smoke:
        cases = [(2, 1, 40)]
        sweep_c, sweep_w = [16, 32], [4]
    elif args.quick:
        cases = [(4, 1, 1024), (64, 1, 8192)]
        sweep_c, sweep_w = [32, 64, 128], [4, 8]
    else:
        cases = [(4, 1, 1024), (4, 1, 8192), (64, 1, 1024), (64, 1, 8192), (256, 1, 8192), (64, 4, 8192)]
        sweep_c, sweep_w = [32, 64, 128, 256], [4, 8]
    budget_s = 0.05 if args.smoke else 0.2
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []

    def inputs(G, Q, C):
        q = torch.randn((G, Q, D), generator=gen).to(dtype).to(device)
        c = torch.randn((G, C, D), generator=gen).to(dtype).to(device)
        n = torch.randint(int(C * LIVE_FRACTION * 0.9), int(C * LIVE_FRACTION * 1.1) + 1, (G,), generator=gen)
        return q, c, n.to(torch.int32).to(device)

    for G, Q, C in cases:
        q, c, n = inputs(G, Q, C)
        live_bytes = int(n.sum()) * D * 2
        out = torch.empty((G, Q, C), device=device)
        ref = score_centroids_reference(q, c, n)
        live = torch.arange(C, device=device) < n[:, None].long()

        def kernel():
            score_centroids(q, c, n, out=out, backend="triton")

        def torch_bmm():
            s = torch.bmm(q, c.transpose(1, 2)).float()
            return s.masked_fill_(~live[:, None, :], float("-inf"))

        def reference():
            return score_centroids_reference(q, c, n)

        for name, fn in (("kernel", kernel), ("torch_bmm", torch_bmm), ("reference", reference)):
            rec: dict[str, Any] = {"G": G, "Q": Q, "C": C, "D": D, "method": name}

            def measure(fn=fn, name=name):
                got = out if name == "kernel" else None
                r = fn()
                got = out if got is not None else r
                fin = torch.isfinite(ref)
                res = {"max_err": float((got[fin] - ref[fin]).abs().max()) if fin.any() else 0.0}
                if not torch.equal(torch.isneginf(got), torch.isneginf(ref)):
                    res["status"] = "mismatch (-inf slots)"
                res.update(bc.time_op(fn, device, budget_s=budget_s))
                return res

            results.append(bc.throughput(bc.attempt(rec, measure), live_bytes, bc.HBM_PEAK_GBPS))

    G, Q, C = cases[-1]
    q, c, n = inputs(G, Q, C)
    live_bytes = int(n.sum()) * D * 2
    sweep = []
    for bcn in sweep_c:
        for nw in sweep_w:
            rec = {"G": G, "Q": Q, "C": C, "block_c": bcn, "num_warps": nw}

            def fn(bcn=bcn, nw=nw):
                score_centroids(q, c, n, backend="triton", block_c=bcn, num_warps=nw)

            sweep.append(bc.throughput(bc.attempt(rec, lambda fn=fn: bc.time_op(fn, device, budget_s=budget_s)),
                                       live_bytes, bc.HBM_PEAK_GBPS))

    bc.print_table(f"score_centroids  D={D} {dtype}  live {LIVE_FRACTION:.0%}  (GB/s of live centroid bytes vs HBM)",
                   results, COLUMNS)
    bc.print_table("score_centroids kernel tile sweep", sweep, ["G", "Q", "C", "block_c", "num_warps", "us", "gbps", "status"])
    ok = [r for r in sweep if r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    payload = {
        "op": "score_centroids",
        "env": bc.environment(),
        "hbm_peak_gbps": bc.HBM_PEAK_GBPS,
        "shape": {"D": D, "dtype": str(dtype), "live_fraction": LIVE_FRACTION},
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
