"""The shape of the code: one package per concern, dependencies pointing one way, no import cycles, no
import-time side effects (docs/ARCHITECTURE.md)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import those before it in this list, never those after; the last three are siblings
# that import none of each other.
LAYERS = ["core", "models", "data", "rewards", "training", "evaluation", "chat"]
SIBLINGS = {"training", "evaluation", "chat"}
PHASE_SCRIPTS = ["prepare_data.py", "sft_train.py", "reward_model.py", "grpo_train.py", "evaluate.py", "chat.py"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "utils").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every ``utils`` module that ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "utils"}
    return found


def test_every_package_and_module_says_its_job():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc) > 30, f"{name} has no module docstring saying what it is for"


def test_dependencies_point_one_way():
    wrong = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        mine = parts[1]
        for dep in _imports(path):
            theirs = dep.split(".")[1] if dep.count(".") else None
            if theirs is None or theirs == mine:
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine) or (mine in SIBLINGS and theirs in SIBLINGS):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the layering core < models < data < rewards < training | evaluation | " \
                      "chat: " + "; ".join(wrong)


def test_no_import_cycles():
    graph = {name: {d for d in _imports(path) if d != name} for name, path in _modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else path + [dep]
            if dep in graph and dep not in state:
                cycle = visit(dep, path + [dep])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for name in graph:
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_importing_the_library_changes_nothing_in_the_process():
    """Importing every module of utils leaves the environment alone and loads no torch; the tuning is the
    scripts' explicit call."""
    code = ("import importlib, json, os, sys; before = dict(os.environ); "
            f"names = {sorted(_modules())!r}; [importlib.import_module(n) for n in names]; "
            "print(json.dumps({'env': sorted(k for k in os.environ if os.environ.get(k) != before.get(k)), "
            "'torch': 'torch' in sys.modules}))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"env": [], "torch": False}, result


@pytest.mark.parametrize("world_size, preset, policy", [
    (None, None, "default"),  # alone: the OpenMP runtime's own policy, as plain torch runs
    ("2", None, "PASSIVE"),  # one of several processes launched together: threads sleep while they wait
    ("2", "active", "ACTIVE"),  # what the user set is kept
])
def test_configure_process_is_explicit_and_idempotent(world_size, preset, policy):
    code = ("import os; from utils.core.runtime import configure_process; "
            "a = configure_process(); b = configure_process(); "
            f"assert a == b and a['omp_wait_policy'] == {policy!r}, a; "
            f"assert os.environ.get('OMP_WAIT_POLICY') == {None if policy == 'default' else preset or policy!r}; "
            "print('ok')")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "WORLD_SIZE")}
    env.update({k: v for k, v in (("WORLD_SIZE", world_size), ("OMP_WAIT_POLICY", preset)) if v is not None})
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("script", PHASE_SCRIPTS)
def test_phase_scripts_tune_the_process_before_parsing(script):
    """Each phase script calls configure_process() first in its main block (parsing a training config
    imports trl, hence torch, and the OpenMP wait policy must be set before that)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    main_block = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert main_block, f"{script} has no `if __name__ == '__main__':` block"
    first = main_block[0].body[0]
    assert isinstance(first, ast.Expr) and ast.unparse(first.value) == "configure_process()", \
        f"{script}: the main block should start with configure_process()"
    doc = ast.get_docstring(tree)
    assert doc.startswith(f"Phase {PHASE_SCRIPTS.index(script) + 1}: "), \
        f"{script}: its docstring should start with 'Phase {PHASE_SCRIPTS.index(script) + 1}: ' (README numbering)"


def test_the_package_is_installed_from_this_checkout():
    """`make setup` installs the project editable, so scripts/ and notebooks import the same utils."""
    r = subprocess.run([sys.executable, "-c", "import utils; print(utils.__file__)"], cwd="/",
                       capture_output=True, text=True)
    assert r.returncode == 0, "utils is not installed in this environment: run `make setup` (pip install -e .)"
    assert Path(r.stdout.strip()).resolve() == (ROOT / "utils" / "__init__.py").resolve()


def test_readme_is_a_guide():
    """The README stays a guide (history lives in docs/EXPERIMENTS.md): at most 15,000 characters, the two
    commands first, the phases in the scripts' numbering."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 15000, f"README.md has {len(text)} characters; move history to docs/EXPERIMENTS.md"
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    for n, script in enumerate(PHASE_SCRIPTS, 1):
        assert f"## Phase {n}:" in text, f"README has no 'Phase {n}' section for {script}"
    for doc in ("docs/ARCHITECTURE.md", "docs/EXPERIMENTS.md"):
        assert (ROOT / doc).is_file() and doc in text
