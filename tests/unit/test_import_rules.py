"""The direction of imports (DESIGN.md section 1): perfmodel <- launch <- parallel <- axon,
kernels <- parallel, axon; perfmodel is standard library (numpy at most); the model does not
import parallel. Checked on the source with `ast`, so a violation fails here, not at a user's."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("axon", "parallel", "kernels", "launch", "perfmodel")
ALLOWED = {  # package -> project packages it may import
    "perfmodel": {"perfmodel"},
    "launch": {"launch", "perfmodel"},
    "kernels": {"kernels"},
    "parallel": {"parallel", "launch", "perfmodel", "kernels"},
    "axon": set(PACKAGES),
}
PERFMODEL_THIRD_PARTY = {"numpy"}


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno))
    return out


def test_import_direction():
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for mod, line in imports_of(path):
                if mod in PACKAGES and mod not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
                if pkg == "perfmodel" and mod not in PACKAGES and mod not in sys.stdlib_module_names \
                        and mod not in PERFMODEL_THIRD_PARTY:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} (perfmodel is stdlib/numpy only)")
    assert not bad, "\n".join(bad)


def test_model_does_not_import_parallel():
    mods = {m for m, _ in imports_of(ROOT / "axon" / "model.py")}
    assert "parallel" not in mods
