"""The docstring examples in utils/ run as tests, so an example that goes stale fails here."""

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runnable_examples(name: str) -> int:
    """How many docstring examples of module ``name`` doctest would run (those marked +SKIP need a model)."""
    tests = doctest.DocTestFinder().find(importlib.import_module(name))
    return sum(not ex.options.get(doctest.SKIP) for t in tests for ex in t.examples)


MODULES = sorted(m for m in (".".join(p.relative_to(ROOT).with_suffix("").parts)
                             for p in (ROOT / "utils").rglob("*.py") if ">>> " in p.read_text(encoding="utf-8"))
                 if _runnable_examples(m))


def test_the_reward_functions_keep_their_examples():
    # Every reward function carries a docstring example (the registry's contract): its module is collected.
    assert {"utils.rewards.rules", "utils.rewards.overlap"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, \
        f"{result.failed} of {result.attempted} docstring examples of {name} failed"
