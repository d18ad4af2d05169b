"""The dependency rule of DESIGN.md, checked on the source (every import, also inside functions) and on a
fresh interpreter (what importing a package really loads)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "heretic_dist"
PRESENTATION = ("heretic_dist.cli", "heretic_dist.report", "heretic_dist.batch", "heretic_dist.display")

# package -> import prefixes it must never use
FORBIDDEN = {
    "heretic_dist.engine": ("ray", "optuna", "heretic_dist.distributed", *PRESENTATION),
    "heretic_dist.search": ("ray", "torch", "transformers", "peft", "heretic_dist.engine",
                            "heretic_dist.distributed", *PRESENTATION),
    "heretic_dist.distributed": PRESENTATION,
    "heretic_dist.rundir": ("ray", "heretic_dist.distributed", *PRESENTATION),  # torch: directions
    "heretic_dist.config": ("ray", "torch", "heretic_dist.distributed", *PRESENTATION),
}
# distributed/ reaches engines only through these two modules
ENGINE_SEAM = ("heretic_dist.engine.protocol", "heretic_dist.engine.types")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, relative ones resolved."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from heretic_dist import cli` names a module too
            out.extend((node.lineno, f"{name}.{a.name}") for a in node.names)
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for line, name in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} {mod} imports {name}"
            if (name == "heretic_dist.cli" or name.startswith("heretic_dist.cli.")) and mod != "heretic_dist.__main__":
                found.append(where + " (only __main__ imports the CLI)")
            for package, banned in FORBIDDEN.items():
                if mod == package or mod.startswith(package + "."):
                    if any(name == b or name.startswith(b + ".") for b in banned):
                        found.append(where)
            if mod.startswith("heretic_dist.distributed") and name.startswith("heretic_dist.engine."):
                if not any(name == s or name.startswith(s + ".") for s in ENGINE_SEAM):
                    found.append(where + " (distributed/ reaches engines through engine/protocol.py)")
    return sorted(set(found))


def test_imports_follow_the_dependency_rule():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule above can fail: a module of search/ that imports torch inside a function is caught."""
    fake = tmp_path / "heretic_dist"
    (fake / "search").mkdir(parents=True)
    (fake / "search" / "bad.py").write_text("def f():\n    import torch.nn\n")
    (fake / "engine").mkdir()
    (fake / "engine" / "bad.py").write_text("from ..distributed import pool\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == [
        "heretic_dist/engine/bad.py:1 heretic_dist.engine.bad imports heretic_dist.distributed",
        "heretic_dist/engine/bad.py:1 heretic_dist.engine.bad imports heretic_dist.distributed.pool",
        "heretic_dist/search/bad.py:2 heretic_dist.search.bad imports torch.nn",
    ]


@pytest.mark.parametrize("module, heavy", [
    ("heretic_dist.search.space", ("torch", "ray", "optuna")),
    ("heretic_dist.search.objectives", ("torch", "ray", "optuna")),
    ("heretic_dist.search.front", ("torch", "ray", "optuna")),
    ("heretic_dist.search.study", ("torch", "ray")),
    ("heretic_dist.engine.protocol", ("torch", "ray", "optuna")),
    ("heretic_dist.engine.engine", ("ray", "optuna")),
])
def test_importing_a_module_loads_only_what_its_layer_allows(module, heavy):
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in {list(heavy)!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
