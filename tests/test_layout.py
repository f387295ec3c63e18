"""The shape of the code: the layering contracts hold and catch a cycle, functions fit on a screen,
modules stay small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "entropix"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: the dev extra installs import-linter")
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(pythonpath), "HOME": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_layering_contracts_hold():
    out = _lint_imports(REPO, REPO / "src")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, broken", [
    # auto builds on the strategies' protocol; the strategies importing auto back would close a loop
    ("decode/phases.py", "from . import strategies  # noqa", "no import cycles"),
    # the sampler sits below the engine: an arrow up, even inside a function
    ("sampler/catalog.py", "def _up():\n    from ..decode import engine  # noqa\n", "floors: no arrow up"),
    # one backend reaching into another
    ("backends/jax/ops.py", "def _other():\n    from ..torch import ops  # noqa\n", "backends do not know each other"),
])
def test_layering_check_fails_on_a_cycle_or_an_arrow_up(tmp_path, module, line, broken):
    """The same contracts over a copy of the package with one bad import added: the check fails
    and names the contract it broke."""
    shutil.copytree(SRC, tmp_path / "src" / "entropix", ignore=shutil.ignore_patterns("__pycache__", "static", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "entropix" / module
    target.write_text(target.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")
    out = _lint_imports(tmp_path, tmp_path / "src")
    assert out.returncode != 0, out.stdout[-2000:]
    assert f"{broken} BROKEN" in out.stdout, out.stdout[-3000:]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_fit_on_a_screen_and_modules_stay_small():
    long_functions, big_modules = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(SRC.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for fn in _functions(ast.parse(text)):
            first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
            n = fn.end_lineno - first + 1
            if n > MAX_FUNCTION_LINES:
                long_functions.append(f"{rel}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long_functions, long_functions
    assert not big_modules, big_modules
