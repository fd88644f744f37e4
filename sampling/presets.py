"""Published sampling recipes: `--preset NAME` sets everything a paper's number depends on.

A preset sets the model, the published checkpoint, the image size, the VAE, the sampler and its steps, the
guidance scale, channels and interval, the uint8 conversion, N = 50,000 and the reference batch (used when the
file is there: ADM's VIRTUAL_imagenet256_labeled.npz). A flag given on the command line overrides the preset's
value, and the manifest records both. A flag that contradicts the preset (a model of another family, or another
model or image size without --ckpt, which the published weights cannot serve) is one line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusion.flow import EULER_MARUYAMA, FAMILY_DIT, FAMILY_REPA, FAMILY_SIT
from diffusion.guidance import CHANNELS_ALL, CHANNELS_FIRST3
from diffusion.samplers import DDPM
from models.vae import UINT8_DIT, UINT8_REPA

ADM_REFERENCE_256 = "VIRTUAL_imagenet256_labeled.npz"
ADM_REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
PUBLISHED_SAMPLES = 50_000
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Preset:
    """A published recipe: its settings (SampleConfig fields), the published checkpoint it samples, the paper's
    FID-50K, and the reference batch the number was measured against."""

    name: str
    paper: str
    fid: float
    family: str
    published: str  # a key of models.checkpoints.PUBLISHED
    settings: dict[str, Any] = field(default_factory=dict)
    reference: str = ADM_REFERENCE_256

    def summary(self) -> str:
        s = self.settings
        interval = s.get("guidance_interval")
        gi = f", interval [{interval[0]:g}, {interval[1]:g}]" if interval else ""
        return (f"{self.paper}, FID {self.fid}: {s['model']} {s['image_size']} px, {s['sampler']} "
                f"{s['num_sampling_steps']}, cfg {s['cfg_scale']} on {s['guidance_channels']} channels{gi}")


def _common(model: str, sampler: str, steps: int, cfg_scale: float, channels: str, uint8: str,
            interval: tuple[float, float] | None = None) -> dict[str, Any]:
    return {"model": model, "image_size": 256, "vae": "ema", "num_classes": IMAGENET_CLASSES, "sampler": sampler,
            "num_sampling_steps": steps, "cfg_scale": cfg_scale, "guidance_channels": channels,
            "guidance_interval": interval, "to_uint8": uint8, "num_fid_samples": PUBLISHED_SAMPLES}


PRESETS: dict[str, Preset] = {
    "dit-xl-2-256": Preset(
        "dit-xl-2-256", "DiT (Peebles & Xie 2023)", 2.27, FAMILY_DIT, "DiT-XL/2-256",
        _common("DiT-XL/2", DDPM, 250, 1.5, CHANNELS_FIRST3, UINT8_DIT)),
    "sit-xl-2-256": Preset(
        "sit-xl-2-256", "SiT (Ma et al. 2024), SDE sampler", 2.06, FAMILY_SIT, "SiT-XL/2-256",
        _common("SiT-XL/2", EULER_MARUYAMA, 250, 1.5, CHANNELS_FIRST3, UINT8_DIT)),
    "repa-sit-xl-2-256": Preset(
        "repa-sit-xl-2-256", "REPA (Yu et al. 2025), SiT-XL/2 4M steps", 1.42, FAMILY_REPA, "REPA-SiT-XL/2-256",
        _common("SiT-XL/2", EULER_MARUYAMA, 250, 1.8, CHANNELS_ALL, UINT8_REPA, (0.0, 0.7))),
}


def presets_help() -> str:
    """One line per preset for --help: its name, the paper's number and the recipe."""
    return "\n".join(f"  {name:<18} {preset.summary()}" for name, preset in PRESETS.items())
