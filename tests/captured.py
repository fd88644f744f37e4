"""Run a command's main(argv) in this process with its stdout and stderr captured (shared test helper)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence


def run_captured(main: Callable[[list[str]], int], argv: Sequence[str],
                 warning_action: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main(argv); ``warning_action`` ("ignore", "always") filters warnings."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        if warning_action is not None:
            warnings.simplefilter(warning_action)
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()
