"""The versions of Python and of the packages that can move a number (recorded in manifests and reports)."""

from __future__ import annotations

import importlib.metadata
import platform

VERSIONED_PACKAGES = ("torch", "diffusers", "timm", "numpy", "pillow", "scipy", "torch-fidelity")


def package_versions() -> dict[str, str]:
    """{"python": ..., "torch": ..., "torch_fidelity": ...}: the installed versions (absent packages left out)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
