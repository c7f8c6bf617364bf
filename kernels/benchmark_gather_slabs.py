"""Benchmark gather_slabs on a GPU: the UVA kernel vs the torch ways of moving the same slabs.

Methods, all moving the same H x M slabs (K and V) from a pinned host pool to the GPU:
  uva_kernel           gather_slabs(backend="triton"): the kernel reads pinned memory in place
  uva_torch_index      torch.index_select on a CUDA view of the pinned pool (uva.device_view)
  cpu_index_copy       CPU index_select into a pinned staging buffer + one copy_ (the classic way)
  per_run_copy         one copy_ per run of consecutive slabs (the "large copy" path)
  contiguous_copy      one copy_ of as many bytes from one place: the pinned-peak reference
Patterns: random slabs (worst case), runs of 4 consecutive slabs (a 64-token cluster at S=16),
runs of 64 (long runs: where per-run copies should win). GB/s is payload / time and is compared
with the 53.5 GB/s pinned peak (FACTS.md). Each UVA result is checked bit-exact first.

Run on the GPU machine:  python -m mosaic_ray.kernels.benchmark_gather_slabs --out docs/results/kernels
CPU smoke test of the code paths:  TRITON_INTERPRET=1 python -m mosaic_ray.kernels.benchmark_gather_slabs --smoke
"""

from __future__ import annotations

from typing import Any

import torch

from mosaic_ray.kernels import benchmark_common as bc
from mosaic_ray.kernels.backend import next_power_of_2
from mosaic_ray.kernels.gather_slabs import gather_slabs, gather_slabs_reference
from mosaic_ray.kernels.uva import device_view

NAME = "benchmark_gather_slabs"
COLUMNS = ["pattern", "MB", "method", "us", "latency_us", "gbps", "frac_of_peak", "exact", "status"]


def make_pool(num_slabs: int, S: int, D: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    pool = torch.empty((num_slabs, 2, S, D), dtype=dtype, pin_memory=pinned)
    pool.view(-1).view(torch.int16 if pool.element_size() == 2 else torch.int32).random_(0, 2**14)
    return pool


def make_ids(num_slabs: int, H: int, M: int, run: int, gen: torch.Generator) -> torch.Tensor:
    """[H, M] distinct slab ids in runs of `run` consecutive slabs (run=1: random slabs)."""
    n_runs = (H * M + run - 1) // run
    starts = torch.randperm(num_slabs // run, generator=gen)[:n_runs] * run
    ids = (starts[:, None] + torch.arange(run)).reshape(-1)[: H * M]
    return ids.view(H, M)


def runs_of(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first slab, first output slot, length) of each run of consecutive ids."""
    flat = ids.reshape(-1).tolist()
    out, start = [], 0
    for i in range(1, len(flat) + 1):
        if i == len(flat) or flat[i] != flat[i - 1] + 1:
            out.append((flat[start], start, i - start))
            start = i
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def run(args) -> dict[str, Any]:
    device = bc.bench_device(args.smoke)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    if args.smoke:
        S, D, H, pool_mb, payloads_mb, patterns = 4, 64, 2, 4, [0.25], {"random": 1, "runs4": 4}
    else:
        S, D, H = 16, 128, 4
        pool_mb = 1024 if args.quick else 4096
        payloads_mb = [1, 16] if args.quick else [1, 4, 16, 64]
        patterns = {"random": 1, "runs4": 4, "runs64": 64}
    elem = torch.empty((), dtype=dtype).element_size()
    slab_bytes = 2 * S * D * elem
    num_slabs = pool_mb * 2**20 // slab_bytes
    pool = make_pool(num_slabs, S, D, dtype, pinned=cuda)
    gen = torch.Generator().manual_seed(0)
    budget = 0.05 if args.smoke else 0.25

    view = None
    view_error = None
    if cuda:
        try:
            view = device_view(pool, device).view(num_slabs, -1)
        except Exception as e:  # noqa: BLE001 - reported, the other methods still run
            view_error = f"{type(e).__name__}: {e}"

    results: list[dict[str, Any]] = []
    for pattern, run_len in patterns.items():
        for mb in payloads_mb:
            M = max(1, int(mb * 2**20) // slab_bytes // H)
            ids_cpu = make_ids(num_slabs, H, M, run_len, gen)
            ids_dev = ids_cpu.to(device)
            runs = runs_of(ids_cpu)
            payload = H * M * slab_bytes
            out_k = torch.empty((H, M * S, D), dtype=dtype, device=device)
            out_v = torch.empty_like(out_k)
            ref_k, ref_v = torch.empty((H, M * S, D), dtype=dtype), torch.empty((H, M * S, D), dtype=dtype)
            gather_slabs_reference(pool, ids_cpu, ref_k, ref_v)
            stage_dev = torch.empty((H * M, 2 * S * D), dtype=dtype, device=device)
            stage_pin = torch.empty((H * M, 2 * S * D), dtype=dtype, pin_memory=cuda)
            flat_pool = pool.view(num_slabs, -1)

            def uva_kernel():
                gather_slabs(pool, ids_dev, out_k, out_v, backend="triton")

            def uva_torch_index():
                if view is None:
                    raise RuntimeError(view_error or "needs CUDA")
                torch.index_select(view, 0, ids_dev.view(-1), out=stage_dev)

            def cpu_index_copy():
                torch.index_select(flat_pool, 0, ids_cpu.view(-1), out=stage_pin)
                stage_dev.copy_(stage_pin, non_blocking=True)

            def per_run_copy():
                for src, dst, n in runs:
                    stage_dev[dst : dst + n].copy_(flat_pool[src : src + n], non_blocking=True)

            def contiguous_copy():
                stage_dev.copy_(flat_pool[: H * M], non_blocking=True)

            def check_kernel() -> bool:
                uva_kernel()
                return torch.equal(_bits(out_k).cpu(), _bits(ref_k)) and torch.equal(_bits(out_v).cpu(), _bits(ref_v))

            def check_stage() -> bool:
                want = flat_pool[ids_cpu.view(-1)]
                return torch.equal(_bits(stage_dev).cpu(), _bits(want))

            methods = [
                ("uva_kernel", uva_kernel, check_kernel),
                ("uva_torch_index", uva_torch_index, lambda: (uva_torch_index(), check_stage())[1]),
                ("cpu_index_copy", cpu_index_copy, lambda: (cpu_index_copy(), check_stage())[1]),
                ("per_run_copy", per_run_copy, lambda: (per_run_copy(), check_stage())[1]),
                ("contiguous_copy", contiguous_copy, None),
            ]
            for name, fn, check in methods:
                rec: dict[str, Any] = {"pattern": pattern, "MB": payload / 2**20, "method": name, "H": H, "M": M,
                                       "runs": len(runs)}
                if name == "uva_torch_index" and not cuda:
                    rec["status"] = "skipped (needs CUDA)"
                    results.append(rec)
                    continue

                def measure(fn=fn, check=check):
                    out: dict[str, Any] = {}
                    if check is not None:
                        out["exact"] = bool(check())
                        if not out["exact"]:
                            out["status"] = "mismatch"
                    out.update(bc.time_op(fn, device, budget_s=budget))
                    return out

                results.append(bc.throughput(bc.attempt(rec, measure), payload, bc.PINNED_PEAK_GBPS))

    sweep = _sweep(pool, num_slabs, S, D, H, dtype, device, gen, args, budget)
    bc.print_table(f"gather_slabs  S={S} D={D} H={H} {dtype}  pool {pool_mb} MB pinned={cuda}", results, COLUMNS)
    bc.print_table("gather_slabs kernel config sweep (random slabs)", sweep, ["block", "num_warps", "MB", "us", "gbps", "frac_of_peak", "status"])
    ok = [r for r in sweep if r.get("status") == "ok"]
    best = max(ok, key=lambda r: r["gbps"]) if ok else None
    payload = {
        "op": "gather_slabs",
        "env": bc.environment(),
        "pinned_peak_gbps": bc.PINNED_PEAK_GBPS,
        "shape": {"S": S, "D": D, "H": H, "dtype": str(dtype), "pool_mb": pool_mb},
        "device_view_error": view_error,
        "results": results,
        "sweep": sweep,
        "best_config": {k: best[k] for k in ("block", "num_warps", "gbps")} if best else None,
        "fallbacks": bc.fallbacks(),
    }
    bc.write_json(args.out, NAME, payload)
    return payload


def _sweep(pool, num_slabs, S, D, H, dtype, device, gen, args, budget) -> list[dict[str, Any]]:
    slab_bytes = 2 * S * D * pool.element_size()
    mb = 0.25 if args.smoke else 16
    M = max(1, int(mb * 2**20) // slab_bytes // H)
    ids = make_ids(num_slabs, H, M, 1, gen).to(device)
    out_k = torch.empty((H, M * S, D), dtype=dtype, device=device)
    out_v = torch.empty_like(out_k)
    blocks = [256, 1024] if args.smoke else [512, 1024, 2048, 4096]
    warps = [4] if args.smoke else [2, 4, 8]
    rows = []
    for block in blocks:
        if block > max(blocks[0], next_power_of_2(S * D)):
            continue  # clipped to one slab anyway
        for nw in warps:
            rec: dict[str, Any] = {"block": block, "num_warps": nw, "MB": H * M * slab_bytes / 2**20}

            def fn(block=block, nw=nw):
                gather_slabs(pool, ids, out_k, out_v, backend="triton", block=block, num_warps=nw)

            rows.append(bc.throughput(bc.attempt(rec, lambda fn=fn: bc.time_op(fn, device, budget_s=budget)),
                                      H * M * slab_bytes, bc.PINNED_PEAK_GBPS))
    return rows


def main(argv: list[str] | None = None) -> None:
    run(bc.parse_args(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
