"""Import rules, checked on the source with `ast` so a violation fails here, not at a user's.

Packages (docs/architecture.md): perfmodel <- launch <- parallel <- axon, perfmodel <- kernels <-
parallel, axon. perfmodel is standard library only (no torch, no other project package), kernels
imports torch, triton and perfmodel only, and the model does not import parallel. Allowed edges only point down that
order, so the packages have no import cycle.

Tests: no file under tests/ imports benchmarks/ or a test module (`test_*`); what tests share
lives in driver modules (tests/distributed/harness.py, trainer_driver.py, ...) or the library.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("axon", "parallel", "kernels", "launch", "perfmodel")
ALLOWED = {  # package -> project packages it may import
    "perfmodel": {"perfmodel"},
    "launch": {"launch", "perfmodel"},
    "kernels": {"kernels", "perfmodel"},
    "parallel": {"parallel", "launch", "perfmodel", "kernels"},
    "axon": set(PACKAGES),
}
THIRD_PARTY = {"perfmodel": set(), "kernels": {"torch", "triton"}}  # packages limited beyond ALLOWED


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(top-level name, line) of every absolute import in `path`, function-local ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno))
    return out


def package_violations(pkg: str, path: Path) -> list[str]:
    bad = []
    where = path.relative_to(ROOT)
    for mod, line in imports_of(path):
        if mod in PACKAGES and mod not in ALLOWED[pkg]:
            bad.append(f"{where}:{line} imports {mod} ({pkg} may import {sorted(ALLOWED[pkg])})")
        elif pkg in THIRD_PARTY and mod not in PACKAGES and mod not in sys.stdlib_module_names \
                and mod not in THIRD_PARTY[pkg]:
            bad.append(f"{where}:{line} imports {mod} ({pkg} may use the standard library"
                       f"{' and ' + ', '.join(sorted(THIRD_PARTY[pkg])) if THIRD_PARTY[pkg] else ' only'})")
    return bad


def test_allowed_directions_have_no_cycle():
    order = ["perfmodel", "kernels", "launch", "parallel", "axon"]  # each imports only what precedes it
    for i, pkg in enumerate(order):
        assert ALLOWED[pkg] <= set(order[:i + 1]), pkg


def test_import_direction():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            bad += package_violations(pkg, path)
    assert not bad, "move the code or the import so imports point down the package order:\n" + "\n".join(bad)


def test_model_does_not_import_parallel():
    mods = {m for m, _ in imports_of(ROOT / "axon" / "model.py")}
    assert "parallel" not in mods


def shared_test_imports(source: str, where: str) -> list[str]:
    """Imports in `source` (the file `where`) of benchmarks/ or of a test module (`test_*`)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names = [base] + [f"{base}.{a.name}" if node.module else base + a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.lstrip(".").split(".")
            if parts[0] == "benchmarks" or any(p.startswith("test_") for p in parts):
                bad.append(f"{where}:{node.lineno} imports {name}")
                break  # one line per import statement
    return bad


def test_tests_import_no_benchmark_or_test_module():
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad += shared_test_imports(path.read_text(), str(path.relative_to(ROOT)))
    assert not bad, ("move what is shared into a driver module under tests/ (like tests/distributed/"
                     "trainer_driver.py) or into the library, and import it from there:\n" + "\n".join(bad))


def test_hygiene_check_catches_the_patterns():
    source = ("from tests.unit.test_tokenizer import x\nfrom benchmarks import zero_driver\n"
              "from . import test_data\nimport benchmarks.pp_common\nfrom tests.unit import tokenizer_fixture\n"
              "from .harness import WorkerPool\n")
    found = [f.split(" imports ")[1] for f in shared_test_imports(source, "probe.py")]
    assert found == ["tests.unit.test_tokenizer", "benchmarks", ".test_data", "benchmarks.pp_common"]
