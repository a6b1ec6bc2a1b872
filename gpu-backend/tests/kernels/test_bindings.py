"""The extension's bindings against its sources, without a compiler: every entry point bindings.cpp declares is
defined once in csrc/*.cu with the same parameters, and every declared one is bound. A mismatch only shows on the
GPU machine as an undefined symbol when the extension loads."""

import re
from pathlib import Path

from ringlinear.kernels._build import CSRC, SOURCES

_DECL = re.compile(r"^void (\w+)\((.*?)\)\s*;", re.S | re.M)
_DEF = re.compile(r"^void (\w+)\((.*?)\)\s*\{", re.S | re.M)


def _params(text: str) -> str:
    return " ".join(text.split())


def test_every_binding_is_defined_with_its_parameters_and_bound():
    bindings = (CSRC / "bindings.cpp").read_text()
    declared = {name: _params(p) for name, p in _DECL.findall(bindings.split("PYBIND11_MODULE")[0])}
    assert declared, "no declarations found in bindings.cpp"
    defined: dict[str, list[tuple[str, str]]] = {}
    for src in SOURCES:
        if src.endswith(".cu"):
            for name, p in _DEF.findall((CSRC / src).read_text()):
                defined.setdefault(name, []).append((src, _params(p)))
    for name, params in declared.items():
        defs = defined.get(name, [])
        assert len(defs) == 1, f"{name}: declared in bindings.cpp, defined {len(defs)} times in the sources"
        assert defs[0][1] == params, f"{name}: bindings.cpp declares ({params}), {defs[0][0]} defines ({defs[0][1]})"
        assert re.search(rf"&ringlinear::{name}\b", bindings), f"{name}: declared but not bound (m.def)"
    for src in SOURCES:
        assert (CSRC / src).exists(), f"_build.SOURCES names {src}, which is not in csrc/"
    assert set(Path(p).name for p in CSRC.glob("*.cu")) <= set(SOURCES), "a csrc/*.cu file is not in _build.SOURCES"
