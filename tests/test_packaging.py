"""The declared requirements resolve together, offline (issue 18: an install that resolves on plain
PyPI). Run by the README's test command, so CI checks them on every run.

Invariants checked, each by a function that takes plain data (the tests at the bottom feed them
synthetic inputs and show that each one can fail):

1. `pyproject.toml` parses, every requirement string (dependencies and every extra) is a valid
   PEP 508 requirement, and no package is named twice (across dependencies and extras) with
   specifiers that no version satisfies together (`conflicts`).
2. Every requirement of the project that applies here (dependencies and the `test` extra; markers
   evaluated for this interpreter and platform) is met by the installed distribution, prereleases
   allowed, and so are the requirements of the extras we ask for (`ray[serve]`) (`unmet`).
3. The installed torch's own requirements are compatible with ours: for each package torch
   requires (markers evaluated here) that we also declare, the two specifier sets admit a version
   together (`incompatible_with`). triton is what this is about: the CUDA builds of torch pin it
   (torch 2.11: triton 3.6.0; torch 2.13: 3.7.1, as the README says), the CPU build requires none.
   Both known CUDA pins are checked against our extras too, whatever torch is installed here.
4. The README's install text names PyTorch's CPU index for torch, with the version its commands
   install, and that version is within our torch range.

"Admit a version together" is decided offline: no index is asked. The candidates are the versions
the specifiers themselves name (`>=3.6` names 3.6), the version installed here, and a few releases
known to exist (`KNOWN_RELEASES`, e.g. triton 3.5.0 ... 3.7.1). A set of specifiers that only a
version outside these admits (`>3.6,<3.6.1`) is reported as a conflict: this check can fail
wrongly that way, never pass wrongly.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from collections import defaultdict
from typing import Callable, Iterable

import pytest
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from tests.conftest import ROOT

PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Releases known to exist on PyPI, candidates for "some version satisfies both" (see above).
KNOWN_RELEASES = {
    "triton": ["3.5.0", "3.5.1", "3.6.0", "3.7.0", "3.7.1"],
    "torch": ["2.11.0", "2.12.0", "2.13.0"],
}
# The triton pins of torch's CUDA wheels on plain PyPI (torch's own metadata; README, pyproject).
TORCH_CUDA_TRITON = {"2.11": "triton==3.6.0", "2.13": "triton==3.7.1"}

Declared = list[tuple[str, Requirement]]  # (where: "dependencies" or "extra NAME", requirement)


def load_pyproject(text: str | None = None) -> dict:
    """The parsed pyproject.toml (or `text`); tomllib raises on a file that is not TOML."""
    return tomllib.loads(PYPROJECT.read_text() if text is None else text)


def declared(pyproject: dict, extras: Iterable[str] | None = None) -> tuple[Declared, list[str]]:
    """The requirements of `pyproject`: its dependencies, then those of `extras` (default: every
    extra), and one error line per string that is not a valid requirement."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    sources = [("dependencies", project.get("dependencies", []))]
    sources += [(f"extra {name}", optional[name]) for name in (optional if extras is None else extras)]
    reqs: Declared = []
    errors = []
    for where, strings in sources:
        for string in strings:
            try:
                reqs.append((where, Requirement(string)))
            except InvalidRequirement as err:
                errors.append(f"{where}: {string!r} is not a valid requirement: {err}")
    return reqs, errors


def applies(req: Requirement, extra: str = "") -> bool:
    """Whether `req`'s marker holds on this interpreter and platform (with `extra` active)."""
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": extra})


def _named_versions(spec: SpecifierSet) -> list[Version]:
    out = []
    for one in spec:
        try:
            out.append(Version(one.version.removesuffix(".*")))
        except InvalidVersion:  # `===` arbitrary strings
            pass
    return out


def admitted(specs: list[SpecifierSet], candidates: Iterable[str | Version] = ()) -> Version | None:
    """A version every spec in `specs` contains (prereleases allowed), among `candidates` and the
    versions the specs name; None when none of those does."""
    pool = {Version(str(c)) for c in candidates}
    for spec in specs:
        pool.update(_named_versions(spec))
    ok = [v for v in sorted(pool) if all(s.contains(v, prereleases=True) for s in specs)]
    return ok[-1] if ok else None


def _candidates(name: str, installed: Callable[[str], str | None]) -> list[str]:
    here = installed(name)
    return KNOWN_RELEASES.get(name, []) + ([here] if here else [])


def conflicts(reqs: Declared, installed: Callable[[str], str | None] = lambda _: None) -> list[str]:
    """One line per package named more than once whose specifiers admit no version together."""
    by_name: dict[str, Declared] = defaultdict(list)
    for where, req in reqs:
        by_name[canonicalize_name(req.name)].append((where, req))
    out = []
    for name, group in sorted(by_name.items()):
        if len(group) > 1 and admitted([r.specifier for _, r in group], _candidates(name, installed)) is None:
            out.append(f"{name}: no version satisfies " + ", ".join(f"{r} ({where})" for where, r in group))
    return out


def unmet(reqs: Declared, installed: Callable[[str], str | None],
          requires: Callable[[str], list[str]] = lambda _: [], extra: str = "") -> list[str]:
    """One line per requirement applicable here (with `extra` active) that the installed
    distributions do not meet: missing, or a version outside the specifier; for a requirement
    with extras (`ray[serve]`), the same for the requirements the installed distribution declares
    with those extras (`requires`), one level deep."""
    out = []
    for where, req in reqs:
        if not applies(req, extra):
            continue
        version = installed(req.name)
        if version is None:
            out.append(f"{req} ({where}): not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{req} ({where}): {req.name} {version} is installed")
        for wanted in sorted(req.extras):
            sub = [(f"{req.name}[{wanted}]", r) for r in map(Requirement, requires(req.name))]
            out += unmet(sub, installed, extra=wanted)
    return out


def incompatible_with(theirs: Iterable[str], ours: Declared, who: str = "torch",
                      installed: Callable[[str], str | None] = lambda _: None) -> list[str]:
    """One line per requirement of `who` (markers evaluated here) on a package we declare too,
    where its specifier and all of ours for that package admit no version together."""
    mine: dict[str, list[Requirement]] = defaultdict(list)
    for _, req in ours:
        mine[canonicalize_name(req.name)].append(req)
    out = []
    for req in map(Requirement, theirs):
        name = canonicalize_name(req.name)
        if not applies(req) or name not in mine:
            continue
        specs = [req.specifier] + [r.specifier for r in mine[name]]
        if admitted(specs, _candidates(name, installed)) is None:
            out.append(f"{who} requires {req}, we declare " + ", ".join(map(str, mine[name])))
    return out


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def installed_requires(name: str) -> list[str]:
    return md.requires(name) or []


# ---- the project as it is ---------------------------------------------------------------------

def test_pyproject_requirements_are_valid_and_do_not_conflict():
    reqs, errors = declared(load_pyproject())
    assert errors == []
    assert {canonicalize_name(r.name) for _, r in reqs} >= {"torch", "ray", "triton", "pytest"}
    assert conflicts(reqs, installed_version) == []


def test_this_environment_meets_the_dependencies_and_the_test_extra():
    reqs, errors = declared(load_pyproject(), extras=["test"])
    assert errors == []
    assert unmet(reqs, installed_version, installed_requires) == []


def test_the_installed_torch_agrees_with_our_ranges(record_property):
    if installed_version("torch") is None:
        pytest.skip("torch is not installed")
    ours, _ = declared(load_pyproject())
    theirs = installed_requires("torch")
    triton = [r for r in theirs if canonicalize_name(Requirement(r).name) == "triton" and applies(Requirement(r))]
    # The CPU build requires no triton; a CUDA build pins one, which our range must admit.
    record_property("torch_triton", f"torch {installed_version('torch')}: {triton or 'no triton requirement'}")
    assert incompatible_with(theirs, ours, installed=installed_version) == []
    assert unmet([("torch's own", Requirement(r)) for r in triton], installed_version) == []


@pytest.mark.parametrize("torch_version", sorted(TORCH_CUDA_TRITON))
def test_the_cuda_torch_builds_triton_pins_fit_our_extras(torch_version):
    ours, _ = declared(load_pyproject())
    assert incompatible_with([TORCH_CUDA_TRITON[torch_version]], ours, who=f"torch {torch_version} (CUDA)") == []
    torch_range = SpecifierSet(",".join(str(r.specifier) for _, r in ours if r.name == "torch"))
    assert torch_range.contains(f"{torch_version}.0")


def test_the_readme_installs_torch_from_the_cpu_index_at_the_tested_version():
    text = README.read_text()
    cpu = re.findall(r"pip install (torch==\S+) --index-url " + re.escape(CPU_INDEX) + r"\b", text)
    assert cpu, f"the README names no `pip install torch==X --index-url {CPU_INDEX}`"
    tested = set(re.findall(r"pip install -q (torch==\S+) &&", text))
    assert tested and set(cpu) == tested  # the CPU install is the version the test command installs
    ours, _ = declared(load_pyproject())
    torch = next(r for _, r in ours if r.name == "torch")
    assert all(torch.specifier.contains(pin.removeprefix("torch==")) for pin in cpu)


# ---- the checks can fail: synthetic inputs ----------------------------------------------------

def _with(pyproject: dict, extra: str, reqs: list[str]) -> dict:
    project = {**pyproject["project"], "optional-dependencies": {
        **pyproject["project"]["optional-dependencies"], extra: reqs}}
    return {**pyproject, "project": project}


def test_a_triton_pin_outside_torchs_fails():
    """The project's pyproject with the gpu extra pinned to triton==3.5.0, against a torch that
    requires triton==3.6.0: incompatible. With the real `triton>=3.6`, compatible."""
    real = load_pyproject()
    pinned, _ = declared(_with(real, "gpu", ["triton==3.5.0"]))
    torch_requires = ["filelock", "triton==3.6.0"]
    assert incompatible_with(torch_requires, pinned) == [
        "torch requires triton==3.6.0, we declare triton>=3.6, triton==3.5.0"]
    assert incompatible_with(torch_requires, declared(real)[0]) == []
    # A requirement whose marker does not hold here is not torch's here.
    assert incompatible_with(['triton==3.6.0; sys_platform == "no-such-platform"'], pinned) == []


def test_a_package_pinned_twice_incompatibly_fails():
    pinned, errors = declared(_with(load_pyproject(), "gpu", ["triton==3.5.0"]))
    assert errors == []
    assert conflicts(pinned) == ["triton: no version satisfies triton>=3.6 (extra test), triton==3.5.0 (extra gpu)"]
    assert conflicts(declared(_with(load_pyproject(), "gpu", ["triton>=3.5,<3.7"]))[0]) == []
    # Only known releases decide between named bounds: 3.6.1..3.6.x is not listed, so this fails.
    assert conflicts([("a", Requirement("triton>3.6")), ("b", Requirement("triton<3.6.1"))]) != []


def test_an_invalid_requirement_string_is_reported():
    _, errors = declared({"project": {"dependencies": ["torch>=2.11", "triton = 3.6"]}})
    assert len(errors) == 1 and "'triton = 3.6' is not a valid requirement" in errors[0]
    with pytest.raises(tomllib.TOMLDecodeError):
        load_pyproject("[project\ndependencies = [")


def test_an_installed_version_outside_the_range_fails():
    reqs = [("extra test", Requirement("triton>=3.6")), ("dependencies", Requirement("ray[serve]==2.60.0"))]
    versions = {"triton": "3.5.0", "ray": "2.60.0", "click": "8.1.0", "fastapi": "0.100.0"}
    ray_requires = ["click>=7", 'uvicorn[standard]; extra == "serve"', 'fastapi>=0.110; extra == "serve"',
                    'pandas; extra == "data"']
    found = unmet(reqs, versions.get, {"ray": ray_requires}.get)
    assert found == ["triton>=3.6 (extra test): triton 3.5.0 is installed",
                     'uvicorn[standard]; extra == "serve" (ray[serve]): not installed',
                     'fastapi>=0.110; extra == "serve" (ray[serve]): fastapi 0.100.0 is installed']
    versions.update(triton="3.7.1", uvicorn="0.30.0", fastapi="0.115.0")
    assert unmet(reqs, versions.get, {"ray": ray_requires}.get) == []  # pandas: only ray[data]'s
    assert unmet([("x", Requirement("triton>=3.6rc1"))], {"triton": "3.6.0rc2"}.get) == []  # prereleases allowed
