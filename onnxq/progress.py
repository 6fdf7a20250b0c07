"""Status lines and progress bars of long work, through ``logging`` (library code never prints).

Status lines go to the ``onnxq`` logger at INFO; the CLI shows them on stderr (``-q`` hides them),
a program using the API sees them once it configures logging (e.g. ``logging.basicConfig(
level=logging.INFO)``). Progress bars show on a terminal only, while the ``onnxq`` logger is
enabled for INFO, unless ``ONNXQ_NO_PROGRESS=1``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("onnxq")


def progress_bar(total: int | None, desc: str, unit: str = "sample", enabled: bool = True) -> tqdm:
    show = enabled and logger.isEnabledFor(logging.INFO) and os.environ.get("ONNXQ_NO_PROGRESS") != "1" and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show, mininterval=0.5)


def log(msg: str, quiet: bool = False) -> None:
    """A status line (INFO on the ``onnxq`` logger); ``quiet`` drops it."""
    if not quiet:
        logger.info(msg)


def warn(msg: str) -> None:
    """A warning (WARNING on the ``onnxq`` logger): shown even with ``-q`` / ``quiet=True``."""
    logger.warning(msg)


@contextlib.contextmanager
def silenced():
    """No status lines or progress bars (the ``onnxq`` logger at WARNING) for the duration."""
    saved = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(saved)


def quiet_option(func):
    """Gives a public entry point a ``quiet=False`` keyword: ``quiet=True`` runs it
    :func:`silenced`. Library functions below the entry points take no such flag: they log."""

    @functools.wraps(func)
    def wrapper(*args, quiet: bool = False, **kwargs):
        if not quiet:
            return func(*args, **kwargs)
        with silenced():
            return func(*args, **kwargs)

    return wrapper
