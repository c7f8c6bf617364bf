"""The Ray / Serve configs, shipped inside the wheel so `mosaic-ray serve` finds them from any
directory (`mosaic_ray.serve.command.resolve_config`). In a checkout, `cluster_configs/` at the
repository root is a link to this folder: one copy of each file.

    local.yaml                  one machine, CPU is enough: the real small stack (dino-smollm2)
    local_tiny.yaml             the same with the tiny random-init model (tests, smoke runs)
    local_auth.yaml             local_tiny.yaml with API keys, tenants and limits
    single_node_multi_gpu.yaml  one node, one shard per GPU
    serve.yaml                  a Ray Serve config file (`serve run`)
    multi_node_cluster.yaml     a Ray cluster launcher file (`ray up`)
"""
