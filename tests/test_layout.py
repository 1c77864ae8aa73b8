"""The layout the project promises: the four stages at the top, one support package that never
imports a stage, and no import circle anywhere (imports inside functions count too)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"world_model", "pretrain", "leq", "evaluate"}


def project_modules() -> dict:
    """{module name: path} of the stages and of leq_utils' modules."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    mods.update({f"leq_utils.{p.stem}": p for p in (ROOT / "leq_utils").glob("*.py") if p.stem != "__init__"})
    return mods


def imports_of(path: Path, known) -> set:
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "leq_utils":
                found |= {f"leq_utils.{a.name}" for a in node.names if f"leq_utils.{a.name}" in known}
            elif node.module in known:
                found.add(node.module)
    return found


def graph() -> dict:
    mods = project_modules()
    return {name: imports_of(path, mods) for name, path in mods.items()}


def test_top_level_holds_the_four_stages_only():
    assert {p.stem for p in ROOT.glob("*.py")} == STAGES


def test_support_package_never_imports_a_stage():
    g = graph()
    offenders = {m: sorted(deps & STAGES) for m, deps in g.items() if m.startswith("leq_utils.") and deps & STAGES}
    assert offenders == {}


def find_cycle(g: dict):
    """A list of modules forming a circle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_import_circle():
    g = graph()
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))
    # the checker itself finds a circle when there is one
    assert find_cycle({**g, "leq_utils.tasks": g["leq_utils.tasks"] | {"leq_utils.d4rl_tasks"},
                       "leq_utils.d4rl_tasks": {"leq_utils.tasks"}}) is not None


def test_stages_import_in_pipeline_order():
    """world_model <- pretrain <- (leq, evaluate): a later stage may import an earlier one, never the reverse."""
    g = graph()
    assert g["world_model"] & STAGES == set()
    assert g["pretrain"] & STAGES == {"world_model"}
    assert g["evaluate"] & STAGES <= {"pretrain", "world_model"}
    assert g["leq"] & STAGES <= {"world_model", "pretrain", "evaluate"}


SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for pattern in ("*.py", "scripts/*", "benchmarks/*")
                 for p in ROOT.glob(pattern) if p.suffix in (".py", ".sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_and_does_nothing_else(script, tmp_path):
    """USAGE.md's promise "every script takes --help": exit 0, a usage text, and no file written
    (install_d4rl.sh once took --help for a venv folder and began to install)."""
    cmd = ["bash" if script.endswith(".sh") else sys.executable, str(ROOT / script), "--help"]
    env = {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}  # nothing in $HOME or /tmp either
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "usage" in p.stdout.lower(), p.stdout
    assert list(tmp_path.iterdir()) == []
