"""GPU kernels of the clustered KV cache: one op per module, each a Triton kernel with a torch
reference (`<op>_reference`) that also serves CPU machines.

    gather_slabs      whole slabs (cluster runs) from the pinned host pool -> device K/V (UVA)
    gather_rows       single token rows from the pinned host pool -> device K/V (token baseline)
    score_centroids   query . centroid for every group in one launch -> [G, Q, C] fp32
    select_budget     best-first clusters under a token budget -> Selection(mask, count, tokens)
    assign_nearest    nearest live centroid and its squared distance, fused (ingest)

Every op takes backend="auto" | "triton" | "torch" (see backend.py); uva.py explains how the
kernels read pinned host memory in place. benchmark_<op>.py beside each op times it on a GPU;
bench_all.py runs them all.
"""

from mosaic_ray.kernels.assign_nearest import assign_nearest, assign_nearest_reference
from mosaic_ray.kernels.backend import FALLBACKS, KernelUnavailableError
from mosaic_ray.kernels.gather_rows import gather_rows, gather_rows_reference
from mosaic_ray.kernels.gather_slabs import gather_slabs, gather_slabs_reference
from mosaic_ray.kernels.score_centroids import score_centroids, score_centroids_reference
from mosaic_ray.kernels.select_budget import Selection, select_budget, select_budget_reference, selected_ids
from mosaic_ray.kernels.uva import UVAError, device_view

__all__ = [
    "FALLBACKS",
    "KernelUnavailableError",
    "Selection",
    "UVAError",
    "assign_nearest",
    "assign_nearest_reference",
    "device_view",
    "gather_rows",
    "gather_rows_reference",
    "gather_slabs",
    "gather_slabs_reference",
    "score_centroids",
    "score_centroids_reference",
    "select_budget",
    "select_budget_reference",
    "selected_ids",
]
