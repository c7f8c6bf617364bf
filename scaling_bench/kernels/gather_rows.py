"""Benchmark gather_rows on a GPU: the token baseline's fetch, made as fast as we can.

Methods, all moving the same H x B single-token rows (K and V) from a pinned host pool:
  uva_kernel        gather_rows(backend="triton") with the default tile
  uva_kernel_best   the best tile of the sweep below (reported so the default can be set from it)
  uva_torch_index   torch.index_select on a CUDA view of the pinned pool (uva.device_view)
  cpu_index_copy    CPU index_select into a pinned staging buffer + one copy_
Patterns: random rows over the whole pool, and the same rows sorted (time order inside a stream).
D=128 (256-byte bf16 rows) and D=64 (128-byte rows: ~42 GB/s measured on an H100).
GB/s is payload / time against the 53.5 GB/s pinned host-to-device peak of an H100; UVA results are checked
bit-exact first.

Run on the GPU machine:  python scaling_bench/kernels/gather_rows.py --out docs/results/kernels
CPU smoke test of the code paths:  TRITON_INTERPRET=1 python scaling_bench/kernels/gather_rows.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.kernels.gather_rows import gather_rows, gather_rows_reference  # noqa: E402
from mosaic_ray.kernels.uva import device_view  # noqa: E402
from scaling_bench.harness.timing import time_op  # noqa: E402
from scaling_bench.kernels import common as bc  # noqa: E402

NAME = "benchmark_gather_rows"
COLUMNS = ["D", "pattern", "B", "MB", "method", "us", "latency_us", "gbps", "frac_of_peak", "exact", "status"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def run(args) -> dict[str, Any]:
    device = bc.bench_device(args.smoke)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    elem = 2
    if args.smoke:
        S, H, pool_mb, dims, budgets = 4, 2, 2, [64], [37]
        sweep_rows, sweep_warps = [8, 32], [4]
    else:
        S, H = 16, 4
        pool_mb = 1024 if args.quick else 4096
        dims = [128] if args.quick else [128, 64]
        budgets = [1024, 12500] if args.quick else [1024, 4096, 12500, 32768]
        sweep_rows, sweep_warps = [8, 16, 32, 64], [2, 4, 8]
    budget_s = 0.05 if args.smoke else 0.25
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    view_errors: dict[int, str] = {}

    for D in dims:
        num_slabs = pool_mb * 2**20 // (2 * S * D * elem)
        pool = torch.empty((num_slabs, 2, S, D), dtype=dtype, pin_memory=cuda)
        pool.view(torch.int16).random_(0, 2**14)
        view = None
        if cuda:
            try:
                view = device_view(pool, device).view(num_slabs * 2 * S, D)
            except Exception as e:  # noqa: BLE001
                view_errors[D] = f"{type(e).__name__}: {e}"
        flat_pool = pool.view(num_slabs * 2 * S, D)

        # Sweep the tile on the largest random case first, to report the best next to the default.
        B_sweep = budgets[-1]
        rows_sweep = torch.randint(0, num_slabs * S, (H, B_sweep), generator=gen).to(device)
        ok_, ov_ = (torch.empty((H, B_sweep, D), dtype=dtype, device=device) for _ in range(2))
        for br in sweep_rows:
            for nw in sweep_warps:
                rec: dict[str, Any] = {"D": D, "block_rows": br, "num_warps": nw, "B": B_sweep}

                def fn(br=br, nw=nw):
                    gather_rows(pool, rows_sweep, "kv", ok_, ov_, backend="triton", block_rows=br, num_warps=nw)

                sweep.append(bc.throughput(bc.attempt(rec, lambda fn=fn: time_op(fn, device, budget_s=budget_s)),
                                           2 * H * B_sweep * D * elem, bc.PINNED_PEAK_GBPS))
        good = [r for r in sweep if r["D"] == D and r.get("status") == "ok"]
        best = max(good, key=lambda r: r["gbps"]) if good else None

        for pattern in ("random", "sorted"):
            for B in budgets:
                rows_cpu = torch.randint(0, num_slabs * S, (H, B), generator=gen)
                if pattern == "sorted":
                    rows_cpu = rows_cpu.sort(dim=1).values
                rows_dev = rows_cpu.to(device)
                payload = 2 * H * B * D * elem
                out_k = torch.empty((H, B, D), dtype=dtype, device=device)
                out_v = torch.empty_like(out_k)
                ref_k, ref_v = gather_rows_reference(
                    pool, rows_cpu, "kv", torch.empty((H, B, D), dtype=dtype), torch.empty((H, B, D), dtype=dtype)
                )
                # Flat row index into [num_slabs * 2 * S, D]: K rows then V rows of each slab.
                slab, off = rows_cpu // S, rows_cpu % S
                flat_k = (slab * 2 * S + off).view(-1)
                flat_kv = torch.cat([flat_k, flat_k + S])
                flat_kv_dev = flat_kv.to(device)
                stage_dev = torch.empty((2 * H * B, D), dtype=dtype, device=device)
                stage_pin = torch.empty((2 * H * B, D), dtype=dtype, pin_memory=cuda)
                want_stage = torch.cat([ref_k.view(-1, D), ref_v.view(-1, D)])

                def kernel(br=None, nw=None):
                    gather_rows(pool, rows_dev, "kv", out_k, out_v, backend="triton", block_rows=br, num_warps=nw)

                def uva_torch_index():
                    if view is None:
                        raise RuntimeError(view_errors.get(D, "needs CUDA"))
                    torch.index_select(view, 0, flat_kv_dev, out=stage_dev)

                def cpu_index_copy():
                    torch.index_select(flat_pool, 0, flat_kv, out=stage_pin)
                    stage_dev.copy_(stage_pin, non_blocking=True)

                def check_out() -> bool:
                    return torch.equal(_bits(out_k).cpu(), _bits(ref_k)) and torch.equal(_bits(out_v).cpu(), _bits(ref_v))

                def check_stage() -> bool:
                    return torch.equal(_bits(stage_dev).cpu(), _bits(want_stage))

                methods = [("uva_kernel", kernel, check_out)]
                if best is not None:
                    methods.append(("uva_kernel_best", lambda b=best: kernel(b["block_rows"], b["num_warps"]), check_out))
                methods += [("uva_torch_index", uva_torch_index, check_stage), ("cpu_index_copy", cpu_index_copy, check_stage)]
                for name, fn, check in methods:
                    rec = {"D": D, "pattern": pattern, "B": B, "H": H, "MB": payload / 2**20, "method": name}
                    if name == "uva_torch_index" and not cuda:
                        rec["status"] = "skipped (needs CUDA)"
                        results.append(rec)
                        continue

                    def measure(fn=fn, check=check):
                        fn()
                        out: dict[str, Any] = {"exact": bool(check())}
                        if not out["exact"]:
                            out["status"] = "mismatch"
                        out.update(time_op(fn, device, budget_s=budget_s))
                        return out

                    results.append(bc.throughput(bc.attempt(rec, measure), payload, bc.PINNED_PEAK_GBPS))
        pool = view = flat_pool = None  # free this D's pool before the next one

    bc.print_table(f"gather_rows  S={S} H={H} {dtype} which=kv pinned={cuda}", results, COLUMNS)
    bc.print_table("gather_rows kernel tile sweep (random rows)", sweep,
                   ["D", "block_rows", "num_warps", "B", "us", "gbps", "frac_of_peak", "status"])
    best_by_d = {}
    for D in dims:
        good = [r for r in sweep if r["D"] == D and r.get("status") == "ok"]
        if good:
            b = max(good, key=lambda r: r["gbps"])
            best_by_d[D] = {k: b[k] for k in ("block_rows", "num_warps", "gbps")}
    payload = {
        "op": "gather_rows",
        "env": bc.environment(),
        "pinned_peak_gbps": bc.PINNED_PEAK_GBPS,
        "shape": {"S": S, "H": H, "dtype": str(dtype), "pool_mb": pool_mb, "which": "kv"},
        "device_view_errors": view_errors,
        "results": results,
        "sweep": sweep,
        "best_config": best_by_d,
    }
    return bc.finish(args.out, NAME, payload)


def main(argv: list[str] | None = None) -> None:
    run(bc.parse_args(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
