"""The docstring examples in utils/ run as tests, so an example that goes stale fails here."""

import doctest
import importlib

import pytest

MODULES = ["utils.evaluation", "utils.formats", "utils.rewards", "utils.text"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples left: drop it from MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
