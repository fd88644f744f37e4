"""Reading a feature network's weights file: one home for the checks both networks make (Inception, DINOv2)."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.runtime.errors import UserError

TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; the legacy pickle format
SNIFF_BYTES = 16
REASON_CHARS = 160


def load_weights_file(path: Path, label: str, expected: str, error: type[UserError], mmap: bool = False) -> dict:
    """The state dict in `path` (memory-mapped when asked and possible); `error` with one line naming `label` and
    what to pass instead (`expected`) when it cannot be read, is not a PyTorch file, or holds no dict."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise error(f"{label}: cannot read it ({exc.strerror or exc})") from None
    if not head.startswith(TORCH_FILE_MAGIC):
        kind = "an empty file" if not head else f"a file starting with {head!r}"
        raise error(f"{label} is not a PyTorch weights file ({kind}); {expected}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise error(f"{label}: cannot load it as PyTorch weights ({type(exc).__name__}: {first[:REASON_CHARS]}; "
                    f"truncated?); {expected}") from None
    if not isinstance(state, dict):
        raise error(f"{label} holds a {type(state).__name__}, not a state dict; {expected}")
    return state
