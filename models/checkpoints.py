"""Find, download, load and validate checkpoints of the DiT family and the flow-matching SiT and REPA families.

Formats: the official raw state dicts (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt), train.py dicts
``{model, ema, opt, args | config}`` of DiT, SiT and this project, REPA's ``{model, ema, opt, args, steps}``
(``ema`` preferred, as sampling uses the EMA weights; REPA's must have it) and ``.safetensors`` files. Key
prefixes left by DistributedDataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``) are stripped,
REPA's legacy ``decoder_blocks.{i}`` become ``blocks.{i + encoder_depth}`` and its training-only
``projectors.*`` are dropped. A checkpoint is untrusted input: ``torch.load(weights_only=True)``, which here
also admits ``argparse.Namespace`` (the ``args`` of the official train.py files), unless the caller opts in
to full pickles (``--allow-pickle``). Every failure is a one-line :class:`CheckpointError` naming the file.

The family (``meta["family"]``: dit | sit | repa, with ``meta["family_evidence"]``) comes from the file when
it can tell: REPA's keys, this project's stored config (``objective``), the official ``args``
(``model`` SiT-... / DiT-...). A raw state dict cannot tell DiT from SiT: the model name decides, and
``meta["family_assumed"]`` says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion.flow import FAMILIES, FAMILY_DIT, FAMILY_REPA, FAMILY_SIT
from launch.runtime.errors import UserError
from launch.runtime.files import DownloadError, FileWriteError, download, torch_hub_checkpoints
from models.dit import CLASS_DROPOUT_PROB, DIT_CONFIGS, LATENT_CHANNELS, MLP_RATIO, DiT
from models.sit import SIT_CONFIGS, SIT_PREFIX, SiT
from models.vae import Codec

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
OFFICIAL_URL_ENV = "DIT_OFFICIAL_URL"  # mirror override (also used by the tests)
OFFICIAL_CHECKPOINTS: dict[int, str] = {256: "DiT-XL-2-256x256.pt", 512: "DiT-XL-2-512x512.pt"}
OFFICIAL_MODEL = "DiT-XL/2"
SIT_RELEASE_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                   "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=1")  # willisma/SiT's download.py
REPA_RELEASE_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
                    "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=1")  # sihyun-yu/REPA's utils.py (4M steps)
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
SAFE_GLOBALS = [argparse.Namespace]  # the `args` of SiT's, REPA's and DiT's train.py checkpoints
DIT_PREFIX = "DiT-"
MODEL_PREFIX_FAMILY = {DIT_PREFIX: FAMILY_DIT, SIT_PREFIX: FAMILY_SIT}
PROJECTOR_PREFIX = "projectors."  # REPA's alignment MLPs: training only
LEGACY_DECODER_RE = re.compile(r"^decoder_blocks\.(\d+)\.")  # REPA's early checkpoints
QK_NORM_SUFFIX = ".attn.q_norm.weight"
REPA_ARGS = ("enc_type", "proj_coeff", "encoder_depth")  # fields only REPA's train.py has
OBJECTIVE_FLOW, OBJECTIVE_DIFFUSION = "flow", "diffusion"  # this project's train.py --objective
FLOW_PATHS = ("linear",)  # SiT's "Linear", REPA's "linear": x_t on a straight line (the only one sampled here)
FLOW_PREDICTIONS = ("velocity", "v")  # SiT's and REPA's names of the velocity target


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
    file in messages, e.g. "checkpoint" or "--resume". Besides tensors and plain containers, only
    ``argparse.Namespace`` is admitted without ``allow_pickle`` (the official train.py ``args``).
    """
    path = Path(path)
    _check_readable(path, what)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
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


def load_checkpoint(
    path: str | os.PathLike, allow_pickle: bool = False, model_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a DiT, SiT or REPA checkpoint -> (state_dict of the sampling network, meta).

    ``meta["kind"]`` is "raw", "train" or "safetensors"; ``meta["path"]`` the file; ``meta["weights"]``
    which entry was used ("ema", "model", ...); ``"family"``, ``"family_evidence"``, ``"family_assumed"``
    (see :func:`resolve_family`; ``model_name`` decides for a raw state dict); ``"ignored_keys"`` and
    ``"renamed_keys"`` when REPA's projectors were dropped or its legacy names renamed; plus ``"config"``
    (a train.py ``config`` dict or ``args`` namespace as a dict) and ``"class_to_idx"`` when present.
    """
    path = Path(path)
    _check_readable(path, "checkpoint")
    meta: dict[str, Any] = {"path": str(path)}
    top_keys: list[str] = []

    if path.suffix == ".safetensors":
        state, st_meta = _load_safetensors(path)
        meta.update(kind="safetensors", weights="tensors")
        for key in ("config", "class_to_idx"):
            parsed = _config_from(st_meta.get(key))
            if parsed is not None:
                meta[key] = parsed
                if key == "config":
                    meta["config_entry"] = key
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
            top_keys = [str(k) for k in obj]
            meta.update(kind="train", weights=entry)
            for key in ("config", "args"):
                config = _config_from(obj.get(key))
                if config is not None:
                    meta.update(config=config, config_entry=key)
                    break
            if isinstance(obj.get("class_to_idx"), dict):
                meta["class_to_idx"] = obj["class_to_idx"]
        if meta.get("config") and isinstance(meta["config"].get("class_to_idx"), dict):
            meta.setdefault("class_to_idx", meta["config"]["class_to_idx"])

    state = _strip_wrapper_prefixes({str(k): v for k, v in state.items()})
    _family_from_file(path, state, meta)
    if meta.get("family") == FAMILY_REPA:
        if meta["kind"] == "train" and meta["weights"] != "ema":
            raise CheckpointError(
                f"REPA checkpoint {path} has no 'ema' weights (it holds {', '.join(top_keys)}); REPA samples "
                "from the EMA weights: pass a checkpoint saved by REPA's train.py, which stores them under 'ema'"
            )
        state = _repa_sampling_state(path, state, meta)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing or not all(isinstance(state[k], torch.Tensor) for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} fits no model family ({' | '.join(FAMILIES)}): {_found(state)}")
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has NaN or Inf in {len(bad)} of {len(state)} tensors of its {meta['weights']} "
            f"weights (first: {bad[0]}); the run that wrote it diverged: use an earlier checkpoint"
        )
    if model_name is not None or meta.get("family") is None:
        resolve_family(meta, model_name)
    return state, meta


def _found(state: dict[str, Any]) -> str:
    """What a state dict that fits no family holds, in a few words."""
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    shown = ", ".join(list(state)[:_MAX_KEYS_SHOWN]) or "nothing"
    missing = ", ".join(k for k in REQUIRED_KEYS if k not in state)
    more = ", ..." if len(state) > _MAX_KEYS_SHOWN else ""
    return (f"{len(tensors)} tensors in {len(state)} entries (keys {shown}{more})"
            + (f", without {missing}" if missing else ", not all tensors"))


# ------------------------------------------------------------------------------------------ families


def _model_family(name: Any) -> str | None:
    """dit / sit from a model name's prefix (DiT-XL/2, SiT-XL/2), None for another name."""
    if isinstance(name, str):
        for prefix, family in MODEL_PREFIX_FAMILY.items():
            if name.startswith(prefix):
                return family
    return None


def _family_from_file(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Set meta["family"] and meta["family_evidence"] when the file itself tells the family (else leave them)."""
    config = meta.get("config") or {}
    _check_flow_path(path, config)
    found: tuple[str, str] | None = None
    if any(k.startswith(PROJECTOR_PREFIX) for k in state):
        found = FAMILY_REPA, "keys projectors.* -> repa"
    elif any(LEGACY_DECODER_RE.match(k) for k in state):
        found = FAMILY_REPA, "keys decoder_blocks.* (REPA's legacy names) -> repa"
    elif any(k.endswith(QK_NORM_SUFFIX) for k in state):
        found = FAMILY_REPA, "keys blocks.*.attn.q_norm.* (qk-norm: only REPA's SiT has it) -> repa"
    elif isinstance(config.get("family"), str):
        if config["family"] not in FAMILIES:
            raise CheckpointError(f"checkpoint {path} names family {config['family']!r} in its config; "
                                  f"expected one of {', '.join(FAMILIES)}")
        objective = config.get("objective", OBJECTIVE_DIFFUSION)
        found = config["family"], f"config family {config['family']}, objective {objective} (trained by this project)"
    elif config.get("objective") in (OBJECTIVE_FLOW, OBJECTIVE_DIFFUSION):
        family = FAMILY_SIT if config["objective"] == OBJECTIVE_FLOW else FAMILY_DIT
        found = family, f"config objective {config['objective']} -> {family} (trained by this project)"
    elif any(k in config for k in REPA_ARGS[:2]):
        found = FAMILY_REPA, f"args.{next(k for k in REPA_ARGS if k in config)} (REPA's train.py) -> repa"
    elif _model_family(config.get("model")) is not None:
        family = _model_family(config["model"])
        found = family, f"{meta.get('config_entry', 'args')}.model {config['model']} -> {family}"
    elif meta.get("config_entry") == "config":
        found = FAMILY_DIT, "config without objective (this project's DiT training) -> dit"
    if found is not None:
        meta.update(family=found[0], family_evidence=found[1], family_assumed=False)


def _check_flow_path(path: Path, config: dict[str, Any]) -> None:
    """SiT's and REPA's args name the interpolant and the target: only the linear path with velocity is sampled."""
    path_type, prediction = config.get("path_type"), config.get("prediction")
    if isinstance(path_type, str) and path_type.lower() not in FLOW_PATHS:
        raise CheckpointError(f"checkpoint {path} was trained on the {path_type} path (its args.path_type); "
                              "only the linear path of SiT and REPA is supported")
    if isinstance(path_type, str) and isinstance(prediction, str) and prediction.lower() not in FLOW_PREDICTIONS:
        raise CheckpointError(f"checkpoint {path} was trained to predict the {prediction} (its args.prediction); "
                              "only velocity prediction is supported")


def resolve_family(meta: dict[str, Any], model_name: str | None) -> str:
    """Complete ``meta``'s family with the model name and check that the two agree; returns the family.

    A file that tells its family keeps it (a DiT-... name for a sit/repa file, or a SiT-... name for a dit
    file, is a CheckpointError); a raw state dict takes the name's family (DiT-... dit, SiT-... sit; dit
    without a name) and is marked ``family_assumed``, so that a later call with a name decides again.
    """
    named = _model_family(model_name)
    family = None if meta.get("family_assumed") else meta.get("family")  # an assumption yields to a name
    where = meta.get("path") or "checkpoint"
    if family is None:
        family = named or FAMILY_DIT
        source = f"family from --model name {model_name}" if named else "no model name says otherwise: dit"
        what = "raw state dict" if meta.get("kind") == "raw" else f"{meta.get('kind', 'a')} file with no family record"
        meta.update(family=family, family_assumed=True,
                    family_evidence=f"{what}: {source} (assumed; the weights cannot tell DiT from SiT)")
    elif named is not None and (named == FAMILY_DIT) != (family == FAMILY_DIT):
        want = "SiT" if family != FAMILY_DIT else "DiT"
        raise CheckpointError(
            f"checkpoint {where} is a {family} checkpoint ({meta['family_evidence']}) but --model {model_name} "
            f"names a {'DiT' if named == FAMILY_DIT else 'SiT'}; pass --model {want}-{model_name.split('-', 1)[1]}"
        )
    return family


def _repa_sampling_state(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """REPA's weights as the sampling network takes them: legacy decoder_blocks renamed, projectors dropped."""
    legacy = {k: m for k in state if (m := LEGACY_DECODER_RE.match(k))}
    if legacy:
        config = meta.get("config") or {}
        encoder_blocks = {int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))}
        depth = config.get("encoder_depth", len(encoder_blocks))
        if not isinstance(depth, int) or encoder_blocks != set(range(depth)):
            raise CheckpointError(f"REPA checkpoint {path} has legacy decoder_blocks.* but its blocks.* "
                                  f"({len(encoder_blocks)}) do not match encoder_depth {depth}")
        renamed = {}
        for k, v in state.items():
            m = legacy.get(k)
            renamed[f"blocks.{int(m.group(1)) + depth}.{k[m.end():]}" if m else k] = v
        state = renamed
        meta["renamed_keys"] = f"decoder_blocks.i -> blocks.(i + {depth}) ({len(legacy)} tensors, REPA's legacy names)"
    dropped = [k for k in state if k.startswith(PROJECTOR_PREFIX)]
    if dropped:
        meta["ignored_keys"] = f"projectors.* ({len(dropped)} tensors: REPA's training-only projector MLPs)"
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}


# ------------------------------------------------------------------------------------------ inference


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read from tensor shapes (assumes a null-label row, i.e. class_dropout_prob > 0).

    Returns patch_size, in_channels, input_size, hidden_size, depth, num_classes, learn_sigma,
    mlp_ratio, qk_norm (REPA's per-head query/key norm: ``blocks.*.attn.q_norm.*`` present), plus label_rows
    and num_tokens. Raises ValueError when the shapes are inconsistent.
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
        qk_norm=any(k.endswith(QK_NORM_SUFFIX) for k in state_dict),
        label_rows=label_rows,
        num_tokens=num_tokens,
    )


def _arch_name(depth: int, hidden: int, patch: int) -> str:
    for name, cfg in {**DIT_CONFIGS, **SIT_CONFIGS}.items():
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
            f"pass --model NAME (one of {', '.join([*DIT_CONFIGS, *SIT_CONFIGS])}) instead of {CUSTOM_MODEL}"
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
    configs = {**DIT_CONFIGS, **SIT_CONFIGS}
    if model_name not in configs:
        raise CheckpointError(
            f"--model {model_name} is unknown; choose one of {', '.join(configs)} or {CUSTOM_MODEL}"
        )
    return configs[model_name], None


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


def _load_weights(
    state: dict[str, torch.Tensor], name: str, model_name: str, family: str = FAMILY_DIT, **dit_kwargs: Any
) -> DiT:
    """The family's network (DiT, or SiT for sit and repa) built on the meta device (no init work) that takes
    the checkpoint's tensors, as float32."""
    with torch.device("meta"):
        model = (DiT if family == FAMILY_DIT else SiT)(**dit_kwargs)
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

    The family (``meta["family"]``, :func:`resolve_family`) picks the network: ``DiT`` for dit, ``models.sit.SiT``
    (the velocity only) for sit and repa, with REPA's qk-norm when its keys are there. Without a checkpoint a
    SiT-... name gives a fresh SiT.
    """
    arch, loaded = _requested_arch(model_name, ckpt, allow_pickle, loaded)
    patch = arch["patch_size"]
    if input_size < patch or input_size % patch:
        raise CheckpointError(
            f"model input size {input_size} (image size / codec downsample) is not a multiple of "
            f"the patch size {patch} of --model {model_name}"
        )
    if ckpt is None:
        meta = {"kind": "init", "path": None, "weights": "init"}
        family = resolve_family(meta, model_name)
        model = (DiT if family == FAMILY_DIT else SiT)(
            input_size=input_size, num_classes=num_classes, in_channels=in_channels or LATENT_CHANNELS, **arch
        )
        return model.eval(), meta

    state, meta = loaded or load_checkpoint(ckpt, allow_pickle=allow_pickle)
    name = meta["path"]
    family = resolve_family(meta, model_name)
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
        family,
        input_size=input_size,
        in_channels=cfg["in_channels"],
        num_classes=num_classes,
        learn_sigma=cfg["learn_sigma"],
        mlp_ratio=cfg["mlp_ratio"] or MLP_RATIO,
        class_dropout_prob=dropout,
        qk_norm=cfg["qk_norm"],
        **arch,
    )
    meta["inferred"] = cfg
    meta["null_label"] = dropout > 0
    return model.eval(), meta


# ------------------------------------------------------------------------------------- official download


@dataclass(frozen=True)
class Published:
    """A published checkpoint: where it comes from (``url_env`` names a mirror override), the file name it is
    cached under in ``$TORCH_HOME/hub/checkpoints``, and the model, image size and family it holds."""

    name: str
    url: str
    url_env: str
    file: str
    model: str
    image_size: int
    family: str

    def source(self) -> str:
        """The URL, or the mirror in the environment variable ``url_env`` (a full file URL; file:// works)."""
        return os.environ.get(self.url_env) or self.url


def _published() -> dict[str, Published]:
    dit = {f"{OFFICIAL_MODEL}-{size}": Published(f"{OFFICIAL_MODEL}-{size}", OFFICIAL_URL + file, OFFICIAL_URL_ENV,
                                                  file, OFFICIAL_MODEL, size, FAMILY_DIT)
           for size, file in OFFICIAL_CHECKPOINTS.items()}
    flow = {
        "SiT-XL/2-256": Published("SiT-XL/2-256", SIT_RELEASE_URL, "DIT_SIT_URL", "SiT-XL-2-256x256.pt", "SiT-XL/2",
                                  256, FAMILY_SIT),
        "REPA-SiT-XL/2-256": Published("REPA-SiT-XL/2-256", REPA_RELEASE_URL, "DIT_REPA_URL",
                                       "REPA-SiT-XL-2-256x256-last.pt", "SiT-XL/2", 256, FAMILY_REPA),
    }
    return {**dit, **flow}


PUBLISHED: dict[str, Published] = _published()  # "DiT-XL/2-256", "DiT-XL/2-512", "SiT-XL/2-256", "REPA-SiT-XL/2-256"


def published_for(model: str, image_size: int) -> Published | None:
    """The published checkpoint of ``model`` at ``image_size`` (DiT-XL/2 256/512, SiT-XL/2 256), or None."""
    return PUBLISHED.get(f"{model}-{image_size}")


def published_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the published checkpoint ``name`` (a key of PUBLISHED), downloaded if not cached.

    Call it on one process per node first (``launch.runtime.dist.node_first``); the others find the file."""
    item = PUBLISHED[name]
    path = (Path(cache_dir) if cache_dir is not None else torch_hub_checkpoints()) / item.file
    if path.is_file():
        return path
    url = official_base_url() + item.file if item.family == FAMILY_DIT else item.source()
    try:
        download(url, path)
    except (DownloadError, FileWriteError) as e:
        raise CheckpointError(f"{e}; {PREFETCH_HINT}") from None
    return path


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
