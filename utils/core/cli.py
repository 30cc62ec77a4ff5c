"""The entry point shared by the phase scripts: logging, argument parsing, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence, TypeVar

from utils.core.config import UserError, parse_args

T = TypeVar("T")


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("ECG_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def guarded(call: Callable[[], object]) -> int:
    """Run ``call()``; a :class:`UserError` becomes one line on stderr. The exit code: 0 done, 2 bad input
    (config, data, missing checkpoint), 130 interrupted."""
    try:
        call()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def run(main: Callable[[T], object], cls: type[T], doc: str | None, argv: Sequence[str] | None = None) -> int:
    """Parse flags onto ``cls`` and call ``main(config)``, with :func:`guarded`'s exit codes."""
    setup_logging()
    return guarded(lambda: main(parse_args(cls, argv, description=doc)))
