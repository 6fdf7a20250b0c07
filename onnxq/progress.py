"""Progress bars for long work (on a terminal only, unless ONNXQ_NO_PROGRESS=1 turns them off) and
status lines on stderr."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "sample", enabled: bool = True) -> tqdm:
    show = enabled and os.environ.get("ONNXQ_NO_PROGRESS") != "1" and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show, mininterval=0.5)


def log(msg: str, quiet: bool = False) -> None:
    """A status line on stderr (stdout is kept for results)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
