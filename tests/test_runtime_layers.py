"""The runtime's layers (`mosaic_ray/runtime/__init__.py`): every import inside `mosaic_ray.runtime`
goes to its own layer or one below, never back up. From the bottom: `config` and `errors`;
`durability/`; `actors/`; `placement/`; `bootstrap`. Every import counts, as in
`test_import_cycles.py` (inside functions, under `TYPE_CHECKING`)."""

from __future__ import annotations

from tests.test_import_cycles import PACKAGE_DIR, import_graph, module_files

LAYERS = {"config": 0, "errors": 0, "durability": 1, "actors": 2, "placement": 3, "bootstrap": 4}


def layer(module: str) -> int:
    """The layer of a module of `mosaic_ray.runtime` (its subpackage's, or its own at the top)."""
    return LAYERS[module.split(".")[2]]


def test_every_runtime_module_has_a_layer():
    runtime = [m for m in module_files(PACKAGE_DIR) if m.startswith("mosaic_ray.runtime.")]
    assert "mosaic_ray.runtime.actors.shard" in runtime and "mosaic_ray.runtime.placement.router" in runtime
    assert not [m for m in runtime if m.split(".")[2] not in LAYERS]


def test_no_runtime_import_goes_up_a_layer():
    graph = import_graph(module_files(PACKAGE_DIR))
    upward = [
        f"{source} -> {target}"
        for source, targets in sorted(graph.items()) if source.startswith("mosaic_ray.runtime.")
        for target in sorted(targets) if target.startswith("mosaic_ray.runtime.") and layer(target) > layer(source)
    ]
    assert not upward, "imports up a layer:\n" + "\n".join(upward)
