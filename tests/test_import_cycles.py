"""No import cycle among the modules of `mosaic_ray` and of `scaling_bench` (the benchmarks, their
harness and the kernel benchmarks): every import counts, wherever it is in a file (module level,
inside a function, under `TYPE_CHECKING`), relative imports resolved, and `from pkg import name`
counted as an import of `pkg.name` when that is a module. And the installed package stands without
the benchmarks: no module of `mosaic_ray` imports `scaling_bench`, and `mosaic_ray` has no `bench`
subpackage, in the tree or in pyproject's packages.

The graph's strongly connected components (Tarjan's algorithm, iterative) with more than one module
are the cycles; the test names each one. `mosaic_ray/kernels` (a link to the repository's kernel
package) is left out.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "mosaic_ray"
BENCH_DIR = ROOT / "scaling_bench"
SKIPPED_DIRS = {"kernels"}


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package_dir` (a package is its __init__)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(root)
        if package_dir.name == "mosaic_ray" and SKIPPED_DIRS & set(relative.parts[1:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every dotted name an Import / ImportFrom anywhere in `tree` may bring in; `package` is the
    package relative imports start from."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name resolves to its longest module prefix)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in imported_names(ast.parse(path.read_text(), str(path)), package):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, each sorted (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def test_the_package_and_the_benchmarks_have_no_import_cycle():
    modules = module_files(PACKAGE_DIR) | module_files(BENCH_DIR)
    assert "mosaic_ray.cache.cluster_index" in modules  # the walk found the package
    assert "scaling_bench.harness.timing" in modules and "scaling_bench.kernels.bench_all" in modules
    found = cycles(import_graph(modules))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_package_does_not_import_the_benchmarks():
    """The installed package runs without a checkout: no module of it imports `scaling_bench`, and
    it ships no `bench` subpackage (the harness is `scaling_bench/harness/`)."""
    importers = []
    for name, path in module_files(PACKAGE_DIR).items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = imported_names(ast.parse(path.read_text(), str(path)), package)
        if any(n == "scaling_bench" or n.startswith("scaling_bench.") for n in found):
            importers.append(name)
    assert not importers, f"modules of mosaic_ray importing scaling_bench: {importers}"
    assert not (PACKAGE_DIR / "bench").exists()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "mosaic_ray" in packages
    assert not [p for p in packages if p == "mosaic_ray.bench" or p.startswith(("mosaic_ray.bench.", "scaling_bench"))]


def test_the_checker_finds_a_cycle_in_a_package(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # inside a function
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n")  # relative, type-only
    (package / "c.py").write_text("import pkg.a\n")  # imports into the cycle, not part of it
    assert cycles(import_graph(module_files(package))) == [["pkg.a", "pkg.sub.b"]]


def test_the_checker_finds_every_cycle_of_a_graph():
    graph = {"x": {"y"}, "y": {"x", "z"}, "z": set(), "p": {"q"}, "q": {"r"}, "r": {"p"}, "s": {"s"}}
    assert cycles(graph) == [["p", "q", "r"], ["x", "y"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
