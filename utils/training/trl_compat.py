"""The private TRL methods this project overrides, each pinned to the TRL version and signature it was
written against.

TRL offers no public hook for how ``GRPOTrainer`` samples completions, computes log-probabilities or masks
completions out of the loss, so :class:`utils.training.grpo.trainer.ECGGRPOTrainer` overrides five private
methods. A private method can change in any TRL release; :func:`overrides` records, next to each override, the parameter list and the
private names of TRL it relies on, and :func:`problems` compares them with the installed TRL:

* a test (``tests/test_trl_compat.py``) fails with the method and the difference, so an upgrade of TRL
  cannot pass CI with an override that no longer fits;
* at run time the trainer falls back to TRL's own paths (with a warning) instead of calling an override
  whose TRL counterpart changed.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable

WRITTEN_AGAINST = "1.16.0"  # the TRL release the overrides were written and measured against


@dataclass(frozen=True)
class Override:
    method: str
    parameters: tuple[str, ...]  # TRL's parameter names, in order, when the override was written
    uses: tuple[str, ...]  # private names of TRL's trainer (attributes, methods) the override relies on
    trl_version: str = WRITTEN_AGAINST


# class name -> method name -> Override
REGISTRY: dict[str, dict[str, Override]] = {}


def overrides(owner: str, parameters: tuple[str, ...], uses: tuple[str, ...] = ()) -> Callable:
    """Mark a method as an override of the private method of the same name of TRL's class ``owner``
    (e.g. ``"GRPOTrainer"``), written against TRL :data:`WRITTEN_AGAINST` with that method's
    ``parameters`` and relying on the private names ``uses``."""

    def mark(fn: Callable) -> Callable:
        REGISTRY.setdefault(owner, {})[fn.__name__] = Override(fn.__name__, tuple(parameters), tuple(uses))
        return fn

    return mark


def problems(owner: str, trl_cls: type) -> list[str]:
    """What no longer fits between the overrides registered for ``owner`` and the installed ``trl_cls``:
    one line per override whose TRL method is gone, has other parameters, or no longer uses a private
    name the override relies on. Empty when everything fits."""
    import trl

    out = []
    source = ""
    for klass in trl_cls.__mro__[:-1]:  # the class and its bases (not object): where the private names live
        try:
            source += inspect.getsource(klass)
        except (OSError, TypeError):
            pass
    for name, o in sorted(REGISTRY.get(owner, {}).items()):
        theirs = getattr(trl_cls, name, None)
        where = f"trl {trl.__version__} {trl_cls.__name__}.{name}"
        if theirs is None:
            out.append(f"{where} is gone (the override was written against trl {o.trl_version})")
            continue
        # Exactly the same parameters: TRL calls the override as it calls its own method, so even a new
        # optional parameter would reach an override that does not expect it.
        params = tuple(inspect.signature(theirs).parameters)
        if params != o.parameters:
            out.append(f"{where} takes ({', '.join(params)}); the override was written against trl {o.trl_version}'s "
                       f"({', '.join(o.parameters)})")
        missing = [u for u in o.uses if source and not re.search(rf"\b{re.escape(u)}\b", source)]
        if missing:
            out.append(f"{where}: trl {trl.__version__}'s {trl_cls.__name__} no longer has {', '.join(missing)}, which "
                       f"the override (written against trl {o.trl_version}) relies on")
    return out
