"""GPU kernels of the clustered KV cache: one op per module, each a Triton kernel with a torch
reference (`<op>_reference`) that also serves CPU machines.

    gather_clusters   a question's best clusters, member by member, from the pinned host pool
                      straight into its slots of the device KV pool (one launch per layer, UVA)
    gather_rows       single token rows from the pinned host pool -> device K/V, or straight
                      into pool slots (frame / token retrieval, prefetch)
    ragged_attention  every sequence of a step over its slots of the device pool (split-KV, GQA)
    assign_nearest    nearest live centroid and its squared distance, fused (ingest)
    vision_elementwise  the vision tower's rotary and QuickGELU, one kernel each

Frame ingests (dense steps) attend through PyTorch's FlashAttention varlen op instead of
ragged_attention (`attention/backend.py`).

Removed after measuring (docs/benchmarks.md section 2): score_centroids (torch bmm was faster),
select_budget (one program per group: slower than sort + cumsum at the few groups of a layer),
gather_slabs (whole slabs cannot stop at a budget inside a cluster; gather_clusters moves members).

Every op takes backend="auto" | "triton" | "torch" (see backend.py); uva.py explains how the
kernels read pinned host memory in place. Their benchmarks are not shipped: in a checkout,
scaling_bench/kernels/<op>.py times an op on a GPU and scaling_bench/kernels/bench_all.py runs them all.
"""

from mosaic_ray.kernels.assign_nearest import assign_nearest, assign_nearest_reference
from mosaic_ray.kernels.backend import FALLBACKS, KernelUnavailableError
from mosaic_ray.kernels.gather_clusters import gather_clusters, gather_clusters_reference
from mosaic_ray.kernels.gather_rows import gather_rows, gather_rows_reference
from mosaic_ray.kernels.uva import UVAError, device_view

__all__ = [
    "FALLBACKS",
    "KernelUnavailableError",
    "UVAError",
    "assign_nearest",
    "assign_nearest_reference",
    "device_view",
    "gather_clusters",
    "gather_clusters_reference",
    "gather_rows",
    "gather_rows_reference",
]
