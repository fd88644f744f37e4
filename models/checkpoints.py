"""Find, download, load and validate DiT checkpoints.

Formats: the official raw state dicts, train.py dicts ``{model, ema, opt, args | config}`` (``ema``
preferred, as sampling uses the EMA weights) and ``.safetensors`` files. Key prefixes left by
DistributedDataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``) are stripped.
A checkpoint is untrusted input: ``torch.load(weights_only=True)`` unless the caller opts in to full
pickles (``--allow-pickle``). Every failure is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from launch.runtime.errors import UserError
from launch.runtime.files import DownloadError, FileWriteError, download, torch_hub_checkpoints
from models.dit import CLASS_DROPOUT_PROB, DIT_CONFIGS, LATENT_CHANNELS, MLP_RATIO, DiT
from models.vae import Codec

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
OFFICIAL_URL_ENV = "DIT_OFFICIAL_URL"  # mirror override (also used by the tests)
OFFICIAL_CHECKPOINTS: dict[int, str] = {256: "DiT-XL-2-256x256.pt", 512: "DiT-XL-2-512x512.pt"}
OFFICIAL_MODEL = "DiT-XL/2"
CUSTOM_MODEL = "custom"  # architecture read from a train.py checkpoint's config (any size)
CUSTOM_ARCH_KEYS = ("depth", "hidden_size", "patch_size", "num_heads")

PREFETCH_HINT = "pass --ckpt PATH or run `python -m launch.prefetch` on a machine with internet"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile
STATE_KEYS_PREFERRED = ("ema", "model", "state_dict")  # where train-style dicts keep the weights
REQUIRED_KEYS = (
    "pos_embed",
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container is a zip archive
REPLACE_HINT = "copy the file again or use an earlier checkpoint"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_MAX_KEYS_SHOWN = 3


class CheckpointError(UserError):
    """A checkpoint cannot be found, read, or does not fit the requested model (one-line message)."""


# ----------------------------------------------------------------------------------------------- loading


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable (permission denied); fix its permissions")


def _read_error(path: Path, what: str, e: Exception, allow_pickle: bool) -> CheckpointError:
    """The one line for a file torch.load refused (it raises RuntimeError, UnpicklingError, OSError, KeyError ...)."""
    msg = str(e)
    if not allow_pickle and "Unsupported global" in msg:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        held = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"{what} {path} holds Python objects{held} that need full unpickling; "
            "pass --allow-pickle only if you trust the file"
        )
    if zipfile.is_zipfile(path):
        reason = msg.strip().splitlines()[0][:120] if msg.strip() else type(e).__name__
        return CheckpointError(f"{what} {path} is corrupt or truncated ({reason}); {REPLACE_HINT}")
    with open(path, "rb") as f:
        starts_like_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if starts_like_zip:  # a zip whose end (central directory) is missing: a cut-off copy
        return CheckpointError(f"{what} {path} is truncated (zip archive without its end); {REPLACE_HINT}")
    return CheckpointError(
        f"{what} {path} is not a PyTorch checkpoint (not a zip archive; truncated or another file type); "
        "pass a file written by torch.save or a .safetensors file"
    )


def read_torch_file(path: str | os.PathLike, allow_pickle: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` onto the CPU; every failure is one :class:`CheckpointError` line naming ``what`` and the file.

    torch.save's zip archives are memory-mapped (``mmap=True``): tensors are read from the file when used and
    the pages are shared through the page cache, so the ranks of a node do not each hold a copy of a training
    checkpoint of which they use only the EMA weights. Legacy (pre-zip) files are read whole. ``what`` names the
    file in messages, e.g. "checkpoint" or "--resume".
    """
    path = Path(path)
    _check_readable(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # any unreadable file is one error line
        raise _read_error(path, what, e, allow_pickle) from None


def _all_finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and show +-Inf: one pass without a temporary (isfinite(t).all() allocates a mask
    # and was ~25x slower on CPU here)
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def nonfinite_keys(state: dict[str, Any]) -> list[str]:
    """Keys of the floating-point tensors that hold NaN or Inf (one tensor at a time: no copy of the state)."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not _all_finite(v)]


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors ships with diffusers
        raise CheckpointError(f"checkpoint {path} is .safetensors but the safetensors package is missing") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device="cpu"), metadata
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"checkpoint {path} is not a readable .safetensors file ({str(e)[:120]})") from None


def _strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _config_from(value: Any) -> dict[str, Any] | None:
    """A plain dict from a train.py ``config`` dict, an argparse Namespace (``args``) or a JSON string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "__dict__"):
        return dict(vars(value))
    return None


def load_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a DiT checkpoint -> (state_dict, meta).

    ``meta["kind"]`` is "raw", "train" or "safetensors"; ``meta["path"]`` the file; ``meta["weights"]``
    which entry was used ("ema", "model", ...); plus ``"config"`` and ``"class_to_idx"`` when present.
    """
    path = Path(path)
    _check_readable(path, "checkpoint")
    meta: dict[str, Any] = {"path": str(path)}

    if path.suffix == ".safetensors":
        state, st_meta = _load_safetensors(path)
        meta.update(kind="safetensors", weights="tensors")
        for key in ("config", "class_to_idx"):
            parsed = _config_from(st_meta.get(key))
            if parsed is not None:
                meta[key] = parsed
    else:
        obj = read_torch_file(path, allow_pickle)
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
        entry = next((k for k in STATE_KEYS_PREFERRED if isinstance(obj.get(k), dict)), None)
        if entry is None:
            state = obj
            meta.update(kind="raw", weights="raw")
        else:
            state = obj[entry]
            meta.update(kind="train", weights=entry)
            config = _config_from(obj.get("config")) or _config_from(obj.get("args"))
            if config is not None:
                meta["config"] = config
            if isinstance(obj.get("class_to_idx"), dict):
                meta["class_to_idx"] = obj["class_to_idx"]
        if meta.get("config") and isinstance(meta["config"].get("class_to_idx"), dict):
            meta.setdefault("class_to_idx", meta["config"]["class_to_idx"])

    state = _strip_wrapper_prefixes({str(k): v for k, v in state.items()})
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing or not all(isinstance(state[k], torch.Tensor) for k in REQUIRED_KEYS):
        shown = ", ".join(missing[:_MAX_KEYS_SHOWN]) or "tensor values"
        raise CheckpointError(f"checkpoint {path} is not a DiT state dict (missing {shown})")
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has NaN or Inf in {len(bad)} of {len(state)} tensors of its {meta['weights']} "
            f"weights (first: {bad[0]}); the run that wrote it diverged: use an earlier checkpoint"
        )
    return state, meta


# ------------------------------------------------------------------------------------------ inference


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read from tensor shapes (assumes a null-label row, i.e. class_dropout_prob > 0).

    Returns patch_size, in_channels, input_size, hidden_size, depth, num_classes, learn_sigma,
    mlp_ratio, plus label_rows and num_tokens. Raises ValueError when the shapes are inconsistent.
    """
    w = state_dict["x_embedder.proj.weight"]  # [D, C, p, p]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"x_embedder.proj.weight has shape {tuple(w.shape)}, expected [D, C, p, p]")
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    num_tokens = int(state_dict["pos_embed"].shape[-2])
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"pos_embed has {num_tokens} tokens, not a square grid")
    out_features = int(state_dict["final_layer.linear.weight"].shape[0])  # p*p*out_channels
    out_channels, rem = divmod(out_features, patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear has {out_features} outputs; expected {patch}*{patch}*{in_channels} or twice that"
        )
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))}
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    label_rows = int(state_dict["y_embedder.embedding_table.weight"].shape[0])
    return dict(
        patch_size=patch,
        in_channels=in_channels,
        input_size=grid * patch,
        hidden_size=hidden,
        depth=len(blocks),
        num_classes=label_rows - 1,
        learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=(int(fc1.shape[0]) / hidden) if fc1 is not None else None,
        label_rows=label_rows,
        num_tokens=num_tokens,
    )


def _arch_name(depth: int, hidden: int, patch: int) -> str:
    for name, cfg in DIT_CONFIGS.items():
        if (cfg["depth"], cfg["hidden_size"], cfg["patch_size"]) == (depth, hidden, patch):
            return name
    return "a custom DiT"


def _custom_arch(ckpt: str | os.PathLike, meta: dict) -> dict[str, int]:
    """depth, hidden_size, patch_size, num_heads of a `custom` checkpoint, from its stored config."""
    config = meta.get("config") or {}
    missing = [k for k in CUSTOM_ARCH_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt} has no architecture config ({', '.join(missing)} missing); "
            f"pass --model NAME (one of {', '.join(DIT_CONFIGS)}) instead of {CUSTOM_MODEL}"
        )
    return {k: int(config[k]) for k in CUSTOM_ARCH_KEYS}


def _requested_arch(
    model_name: str, ckpt: str | os.PathLike | None, allow_pickle: bool,
    loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> tuple[dict[str, int], tuple[dict[str, torch.Tensor], dict] | None]:
    """(depth, hidden_size, patch_size, num_heads) of ``--model``, and the checkpoint if reading it was needed."""
    if model_name == CUSTOM_MODEL:
        if ckpt is None:
            raise CheckpointError(f"--model {CUSTOM_MODEL} takes its architecture from a checkpoint; pass --ckpt")
        loaded = loaded or load_checkpoint(ckpt, allow_pickle=allow_pickle)
        return _custom_arch(ckpt, loaded[1]), loaded
    if model_name not in DIT_CONFIGS:
        raise CheckpointError(
            f"--model {model_name} is unknown; choose one of {', '.join(DIT_CONFIGS)} or {CUSTOM_MODEL}"
        )
    return DIT_CONFIGS[model_name], None


def _input_size_error(name: str, cfg: dict[str, Any], input_size: int, codec: Codec | None) -> CheckpointError:
    """The checkpoint's grid differs from the requested one: blame the codec's factor or --image-size."""
    want = cfg["input_size"]
    if codec is None or codec.downsample == 1:
        return CheckpointError(
            f"checkpoint {name} has {cfg['num_tokens']} position tokens (model input size {want}) "
            f"but the requested model input size is {input_size} (check --image-size)"
        )
    factor, image_size = codec.downsample, input_size * codec.downsample
    ratio, rest = divmod(image_size, want)
    fitting_vae = ratio > 1 and not rest and not ratio & (ratio - 1)  # VAE factors are powers of two
    other_factor = f"a VAE with factor {ratio} or " if fitting_vae else ""
    return CheckpointError(
        f"checkpoint {name} takes {want}x{want} latents, but --image-size {image_size} through {codec.source} "
        f"(downsampling factor {factor}) gives {input_size}x{input_size}; use {other_factor}"
        f"--image-size {want * factor}"
    )


def _label_dropout(name: str, rows: int, num_classes: int) -> float:
    """The label dropout the checkpoint was trained with, read from its label rows (a null row or none)."""
    if rows == num_classes + 1:
        return CLASS_DROPOUT_PROB  # a null-label row exists, so training used label dropout
    if rows == num_classes:
        return 0.0  # trained without label dropout: no null label, no guidance possible
    raise CheckpointError(
        f"checkpoint {name} has {rows} label rows (num_classes={rows - 1}) but --num-classes is {num_classes}"
    )


def _check_fit(
    name: str,
    cfg: dict[str, Any],
    model_name: str,
    arch: dict[str, int],
    input_size: int,
    in_channels: int | None,
    codec: Codec | None,
) -> None:
    """One line for the first way the checkpoint's architecture disagrees with the request."""
    if (cfg["depth"], cfg["hidden_size"]) != (arch["depth"], arch["hidden_size"]):
        found = _arch_name(cfg["depth"], cfg["hidden_size"], cfg["patch_size"])
        raise CheckpointError(
            f"checkpoint {name} is {found} (depth {cfg['depth']}, width {cfg['hidden_size']}) but --model "
            f"{model_name} has depth {arch['depth']}, width {arch['hidden_size']}"
        )
    if cfg["patch_size"] != arch["patch_size"]:
        raise CheckpointError(
            f"checkpoint {name} has patch size {cfg['patch_size']} but --model {model_name} uses patch "
            f"{arch['patch_size']}"
        )
    if in_channels is not None and cfg["in_channels"] != in_channels:
        raise CheckpointError(
            f"checkpoint {name} takes {cfg['in_channels']} input channels but the codec gives {in_channels} "
            "(check --vae)"
        )
    if cfg["input_size"] != input_size:
        raise _input_size_error(name, cfg, input_size, codec)


def _load_weights(state: dict[str, torch.Tensor], name: str, model_name: str, **dit_kwargs: Any) -> DiT:
    """A DiT built on the meta device (no init work) that takes the checkpoint's tensors, as float32."""
    with torch.device("meta"):
        model = DiT(**dit_kwargs)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch inside a block (e.g. another MLP width)
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"checkpoint {name} does not match {model_name}: {first[:160]}") from None
    problems = [*result.missing_keys, *result.unexpected_keys]
    if problems:
        raise CheckpointError(
            f"checkpoint {name} does not match {model_name}: "
            f"{len(result.missing_keys)} missing keys, {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {', '.join(problems[:_MAX_KEYS_SHOWN])})"
        )
    model = model.float()
    model.t_embedder.reset_frequencies()  # a non-persistent buffer: still on the meta device after the load
    return model


def checkpoint_channels(state: dict[str, torch.Tensor], name: str | os.PathLike) -> int:
    """The input channels of a loaded checkpoint (what its patch embedding takes)."""
    try:
        return int(infer_config(state)["in_channels"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {name}: {e}") from None


def build_model(
    model_name: str,
    ckpt: str | os.PathLike | None,
    input_size: int,
    num_classes: int,
    allow_pickle: bool = False,
    in_channels: int | None = None,
    codec: Codec | None = None,
    loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> tuple[DiT, dict]:
    """Build ``model_name`` for an ``input_size`` grid (latent or pixel) and load ``ckpt`` into it.

    in_channels and learn_sigma come from the checkpoint; pass ``in_channels`` (the codec's latent
    channels) to have it checked, and ``codec`` (the codec the inputs come from) to have a grid that differs
    from the checkpoint's explained by the codec's flag and downsampling factor. ``ckpt=None`` gives a freshly
    initialised model (4 channels unless given). ``loaded``: what ``load_checkpoint(ckpt)`` returned, when the
    caller has read it already (the file is then not read again). The model is returned in eval mode on the CPU.
    """
    arch, loaded = _requested_arch(model_name, ckpt, allow_pickle, loaded)
    patch = arch["patch_size"]
    if input_size < patch or input_size % patch:
        raise CheckpointError(
            f"model input size {input_size} (image size / codec downsample) is not a multiple of "
            f"the patch size {patch} of --model {model_name}"
        )
    if ckpt is None:
        model = DiT(input_size=input_size, num_classes=num_classes, in_channels=in_channels or LATENT_CHANNELS, **arch)
        return model.eval(), {"kind": "init", "path": None, "weights": "init"}

    state, meta = loaded or load_checkpoint(ckpt, allow_pickle=allow_pickle)
    name = meta["path"]
    try:
        cfg = infer_config(state)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {name}: {e}") from None
    _check_fit(name, cfg, model_name, arch, input_size, in_channels, codec)
    dropout = _label_dropout(name, cfg["label_rows"], num_classes)
    model = _load_weights(
        state,
        name,
        model_name,
        input_size=input_size,
        in_channels=cfg["in_channels"],
        num_classes=num_classes,
        learn_sigma=cfg["learn_sigma"],
        mlp_ratio=cfg["mlp_ratio"] or MLP_RATIO,
        class_dropout_prob=dropout,
        **arch,
    )
    meta["inferred"] = cfg
    meta["null_label"] = dropout > 0
    return model.eval(), meta


# ------------------------------------------------------------------------------------- official download


def official_base_url() -> str:
    """OFFICIAL_URL, or a mirror given in $DIT_OFFICIAL_URL (a folder URL ending in '/')."""
    return os.environ.get(OFFICIAL_URL_ENV) or OFFICIAL_URL


def official_cache_path(image_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the official DiT-XL/2 checkpoint for ``image_size`` lives: ``$TORCH_HOME/hub/checkpoints``."""
    if image_size not in OFFICIAL_CHECKPOINTS:
        raise CheckpointError(
            f"no official DiT checkpoint for --image-size {image_size} (available: "
            f"{', '.join(map(str, OFFICIAL_CHECKPOINTS))}); {PREFETCH_HINT}"
        )
    base = Path(cache_dir) if cache_dir is not None else torch_hub_checkpoints()
    return base / OFFICIAL_CHECKPOINTS[image_size]


def official_checkpoint(image_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the official DiT-XL/2 checkpoint for ``image_size`` (256 or 512), downloaded if not cached.

    Call it on rank 0 first (``launch.runtime.dist.rank0_then_others``); the others then find the cached file.
    """
    path = official_cache_path(image_size, cache_dir)
    if path.is_file():
        return path
    url = official_base_url() + OFFICIAL_CHECKPOINTS[image_size]
    try:
        download(url, path)
    except (DownloadError, FileWriteError) as e:
        raise CheckpointError(f"{e}; {PREFETCH_HINT}") from None
    return path
