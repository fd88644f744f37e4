"""Fetch the sampler's and the evaluator's weight files on a machine with internet, for offline compute nodes.

    python -m launch.prefetch                   # all: DiT-XL/2 256 and 512, SiT, REPA, both VAEs, Inception, DINOv2
    python -m launch.prefetch --models DiT-XL/2-256 --vae ema --inception
    python -m launch.prefetch --preset repa-sit-xl-2-256       # what sample_ddp.py --preset needs
    python -m launch.prefetch --dinov2                          # FD_DINOv2's ViT-L/14 (1.2 GB)
    python -m launch.prefetch --dry-run                         # what would be fetched, and where

Files go where the sampler and the evaluator look for them: the published DiT, SiT and REPA checkpoints, each
checked to load as its family, torch-fidelity's
Inception weights and DINOv2's `dinov2_vitl14_pretrain.pth` into torch hub's cache ($TORCH_HOME/hub/checkpoints),
the sd-vae-ft VAEs
into the Hugging Face cache ($HF_HOME/hub, or $HF_HUB_CACHE). Each item is loaded once to prove it is
usable, and the SHA-256 of its files is recorded in `prefetch-sha256.json` in that cache folder; a rerun
skips what is present with the recorded sums, and fetches again what changed. The last lines printed are
the environment for offline use (TORCH_HOME, HF_HOME, HF_HUB_OFFLINE=1).

Sources can be redirected (mirrors, tests): $DIT_OFFICIAL_URL (a folder URL for the DiT files), $DIT_SIT_URL and
$DIT_REPA_URL (the SiT and REPA files' URLs),
$DIT_INCEPTION_URL (the Inception file's URL), $DIT_DINOV2_URL (the DINOv2 file's URL), $HF_ENDPOINT (the hub).
file:// URLs work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusion.flow import FAMILY_DIT
from evaluation import dinov2
from evaluation.inception import TORCH_FIDELITY_URL, TORCH_FIDELITY_WEIGHTS, InceptionWeightsError, resolve_weights
from launch.runtime.command import run_command
from launch.runtime.errors import EXIT_FAILED, EXIT_OK, UserError
from launch.runtime.files import (
    DownloadError,
    FileWriteError,
    download,
    env_true,
    file_sha256,
    hf_hub_cache,
    root_reason,
    torch_hub_checkpoints,
    write_json_atomic,
)
from models.checkpoints import PUBLISHED, CheckpointError, Published, load_checkpoint, official_base_url
from models.vae import VAE_CONFIG, VAE_REPOS, VAE_WEIGHTS
from sampling.presets import PRESETS

PRESET_WEIGHTS = {name: (preset.published, preset.settings["vae"]) for name, preset in PRESETS.items()}

EXIT_NOT_FETCHED = EXIT_FAILED  # at least one item could not be fetched or does not load
SUMS_NAME = "prefetch-sha256.json"
INCEPTION_URL_ENV = "DIT_INCEPTION_URL"
DINOV2_URL_ENV = "DIT_DINOV2_URL"

EXAMPLES = """examples:
  python -m launch.prefetch
  python -m launch.prefetch --models DiT-XL/2-256 --vae ema --inception
  python -m launch.prefetch --dinov2
  python -m launch.prefetch --preset repa-sit-xl-2-256
  TORCH_HOME=/shared/cache/torch HF_HOME=/shared/cache/hf python -m launch.prefetch --dry-run
"""


class PrefetchError(UserError):
    """An item cannot be fetched or does not load; the message is one line."""


def _model_choices() -> dict[str, Published]:
    return dict(PUBLISHED)  # "DiT-XL/2-256", "DiT-XL/2-512", "SiT-XL/2-256", "REPA-SiT-XL/2-256"


def _vae_choices() -> dict[str, str]:
    return dict(VAE_REPOS)


# --------------------------------------------------------------------------------------------- helpers


def hub_snapshot(repo: str, cache_dir: Path, allow_patterns: list[str], endpoint: str | None,
                 local_only: bool = False, force: bool = False) -> Path:
    """The hub snapshot folder of `repo` holding `allow_patterns` (downloaded unless `local_only`;
    `force` downloads again files already cached)."""
    from huggingface_hub import snapshot_download  # only for a VAE item (seconds to import)

    return Path(snapshot_download(repo, cache_dir=str(cache_dir), allow_patterns=allow_patterns,
                                  endpoint=endpoint, local_files_only=local_only, force_download=force))


class SumsFile:
    """`prefetch-sha256.json` in a cache folder: {path relative to the folder: {sha256, bytes, source}}."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / SUMS_NAME

    def read(self) -> dict[str, dict]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def matches(self, files: Sequence[Path]) -> bool:
        """Every file is recorded and still has its recorded SHA-256."""
        recorded = self.read()
        for f in files:
            entry = recorded.get(self.key(f))
            if not isinstance(entry, dict) or entry.get("sha256") != file_sha256(f):
                return False
        return True

    def key(self, f: Path) -> str:
        return str(f.relative_to(self.folder))

    def record(self, files: Sequence[Path], source: str) -> None:
        data = self.read()
        for f in files:
            data[self.key(f)] = {"sha256": file_sha256(f), "bytes": f.stat().st_size, "source": source,
                                 "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(self.path, dict(sorted(data.items())))


# --------------------------------------------------------------------------------------------- items


@dataclass
class UrlItem:
    """One file fetched from a URL into torch hub's checkpoint folder, checked by `verify(path)`."""

    name: str
    url: str
    dest: Path
    verify_fn: Callable[[Path], None]

    @property
    def folder(self) -> Path:
        return self.dest.parent

    @property
    def source(self) -> str:
        return self.url

    def local_files(self) -> list[Path] | None:
        return [self.dest] if self.dest.is_file() else None

    def fetch(self, force: bool = False) -> list[Path]:
        try:  # always a fresh download (atomic replace)
            download(self.url, self.dest)
        except (DownloadError, FileWriteError) as exc:
            raise PrefetchError(str(exc)) from None
        return [self.dest]

    def verify(self, files: list[Path]) -> None:
        self.verify_fn(files[0])

    def describe(self) -> str:
        return f"{self.url} -> {self.dest}"


@dataclass
class HubItem:
    """A diffusers AutoencoderKL repository in the Hugging Face cache (config + one weights file)."""

    name: str
    repo: str
    cache_dir: Path

    @property
    def folder(self) -> Path:
        return self.cache_dir

    @property
    def source(self) -> str:
        return self.repo

    def _files(self, snapshot: Path) -> list[Path] | None:
        weights = next((snapshot / w for w in VAE_WEIGHTS if (snapshot / w).is_file()), None)
        config = snapshot / VAE_CONFIG
        return [config, weights] if weights is not None and config.is_file() else None

    def local_files(self) -> list[Path] | None:
        try:
            snapshot = hub_snapshot(self.repo, self.cache_dir, [VAE_CONFIG, *VAE_WEIGHTS], None,
                                    local_only=True)
        except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and relatives)
            return None
        return self._files(snapshot)

    def fetch(self, force: bool = False) -> list[Path]:
        if env_true("HF_HUB_OFFLINE"):
            raise PrefetchError(f"HF_HUB_OFFLINE is set; unset it to download {self.repo}")
        endpoint = os.environ.get("HF_ENDPOINT") or None
        try:
            for weights in VAE_WEIGHTS:  # safetensors when the repo has it, else the pickle
                patterns = [VAE_CONFIG, weights]
                snapshot = hub_snapshot(self.repo, self.cache_dir, patterns, endpoint, force=force)
                files = self._files(snapshot)
                if files is not None:
                    return files
        except Exception as exc:  # noqa: BLE001 - connection, HTTP, repository errors: one line each
            raise PrefetchError(f"cannot download {self.repo} ({root_reason(exc)})") from None
        raise PrefetchError(f"{self.repo} has no {VAE_CONFIG} with {' or '.join(VAE_WEIGHTS)}")

    def verify(self, files: list[Path]) -> None:
        from diffusers import AutoencoderKL  # seconds to import: only to verify a VAE

        try:
            with warnings.catch_warnings():  # diffusers' deprecated hub argument
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                AutoencoderKL.from_pretrained(self.repo, cache_dir=str(self.cache_dir), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            reason = root_reason(exc)
            raise PrefetchError(f"{self.repo} does not load from {self.cache_dir} ({reason})") from None

    def describe(self) -> str:
        return f"huggingface.co/{self.repo} -> {self.cache_dir}"


def _model_check(item: Published):  # noqa: ANN202 - a check of the downloaded file
    """The file loads as the published model's family (a REPA file as repa, ...), with finite weights."""

    def check(path: Path) -> None:
        try:
            _, meta = load_checkpoint(path, model_name=item.model)
        except CheckpointError as exc:
            raise PrefetchError(str(exc)) from None
        if meta.get("family") != item.family:
            raise PrefetchError(f"{path} holds a {meta.get('family')} checkpoint, not the {item.family} weights "
                                f"{item.name}; delete it and fetch again")

    return check


def _verify_inception(path: Path) -> None:
    try:
        resolve_weights(path, allow_download=False)
    except InceptionWeightsError as exc:
        raise PrefetchError(str(exc)) from None


def _verify_dinov2(path: Path) -> None:
    try:  # the architecture FD_DINOv2 uses, read from the file (memory-mapped)
        dinov2.resolve_dinov2_weights(path, allow_download=False, arch=dinov2.METRIC_ARCH)
    except dinov2.DinoV2WeightsError as exc:
        raise PrefetchError(str(exc)) from None


def build_items(models: list[str], vaes: list[str], inception: bool,
                with_dinov2: bool = False) -> list[UrlItem | HubItem]:
    published, repos = _model_choices(), _vae_choices()
    items: list[UrlItem | HubItem] = []
    for name in models:
        item = published[name]
        url = official_base_url() + item.file if item.family == FAMILY_DIT else item.source()
        items.append(UrlItem(name, url, torch_hub_checkpoints() / item.file, _model_check(item)))
    items += [HubItem(f"vae {v}", repos[v], hf_hub_cache()) for v in vaes]
    if inception:
        url = os.environ.get(INCEPTION_URL_ENV) or TORCH_FIDELITY_URL
        dest = torch_hub_checkpoints() / TORCH_FIDELITY_WEIGHTS
        items.append(UrlItem("inception", url, dest, _verify_inception))
    if with_dinov2:
        url = os.environ.get(DINOV2_URL_ENV) or dinov2.DINOV2_URL
        items.append(UrlItem("dinov2", url, torch_hub_checkpoints() / dinov2.DINOV2_WEIGHTS, _verify_dinov2))
    return items


def prefetch_item(item: UrlItem | HubItem, dry_run: bool) -> str:
    """Make one item present and verified; returns its status line. Raises PrefetchError."""
    sums = SumsFile(item.folder)
    files = item.local_files()
    if files is not None and sums.matches(files):
        return f"{item.name}: present, SHA-256 matches {sums.path}"
    if dry_run:
        return f"{item.name}: would {'check' if files else 'fetch'} {item.describe()}"
    if files is not None and not sums.read().get(sums.key(files[0])):
        try:  # present but never recorded (e.g. downloaded by the sampler): keep it if it loads
            item.verify(files)
            sums.record(files, "found in cache")
            return f"{item.name}: present, loads; SHA-256 recorded in {sums.path}"
        except PrefetchError:
            pass
    files = item.fetch(force=files is not None)  # present but changed: replace it
    try:
        item.verify(files)
    except PrefetchError as exc:
        raise PrefetchError(f"fetched but does not load: {exc}") from None
    sums.record(files, item.source)
    return f"{item.name}: fetched and verified ({item.describe()})"


def offline_env_lines() -> list[str]:
    """The shell lines that point the sampler and the evaluator at these caches, offline."""
    torch_home = torch_hub_checkpoints().parent.parent  # <TORCH_HOME>/hub/checkpoints
    if os.environ.get("HF_HUB_CACHE"):
        hf_line = f"export HF_HUB_CACHE={Path(os.environ['HF_HUB_CACHE']).resolve()}"
    else:  # <HF_HOME>/hub
        hf_line = f"export HF_HOME={hf_hub_cache().parent.resolve()}"
    return [f"export TORCH_HOME={torch_home.resolve()}", hf_line, "export HF_HUB_OFFLINE=1"]


# --------------------------------------------------------------------------------------------- CLI


def _split(text: str, choices: Sequence[str], flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise PrefetchError(f"{flag} {text!r}: unknown {', '.join(unknown) or 'empty list'}; "
                            f"choose from {','.join(choices)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.prefetch", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated published checkpoints: {','.join(PUBLISHED)}")
    p.add_argument("--preset", choices=list(PRESET_WEIGHTS),
                   help="a sampling preset's weights, its VAE and Inception (what sample_ddp.py --preset needs)")
    p.add_argument("--vae", help="comma-separated sd-vae-ft VAEs: ema,mse")
    p.add_argument("--inception", action="store_true", help="torch-fidelity's Inception weights (FID, IS)")
    p.add_argument("--dinov2", action="store_true", help=f"DINOv2 ViT-L/14 weights {dinov2.DINOV2_WEIGHTS} (FD_DINOv2)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be fetched, and where")
    p.epilog += "\nwith none of --models/--vae/--inception/--dinov2, everything is fetched\n"
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: plan_items(args), lambda items: fetch_all(items, args.dry_run))


def plan_items(args: argparse.Namespace) -> list[UrlItem | HubItem]:
    """What to fetch, from the flags (every item when none is named); one line naming a bad flag value."""
    if args.preset is not None:
        model, vae = PRESET_WEIGHTS[args.preset]
        return build_items([model], [vae], True, args.dinov2)
    everything = args.models is None and args.vae is None and not args.inception and not args.dinov2
    models = _split(args.models, list(_model_choices()), "--models") if args.models is not None else []
    vaes = _split(args.vae, list(_vae_choices()), "--vae") if args.vae is not None else []
    if everything:
        models, vaes = list(_model_choices()), list(_vae_choices())
    return build_items(models, vaes, args.inception or everything, args.dinov2 or everything)


def fetch_all(items: list[UrlItem | HubItem], dry_run: bool) -> int:
    """Fetch and check every item (or say what would be fetched); exit 1 when any could not be."""
    failed = 0
    for item in items:
        try:
            print(prefetch_item(item, dry_run), flush=True)
        except PrefetchError as exc:
            failed += 1
            print(f"{item.name}: NOT fetched: {exc}", flush=True)
    print("# for offline compute nodes (job script or ~/.bashrc):")
    for line in offline_env_lines():
        print(line)
    if failed:
        print(f"error: {failed} item(s) not fetched; run this on a machine with internet", file=sys.stderr)
        return EXIT_NOT_FETCHED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
