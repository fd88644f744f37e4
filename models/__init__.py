"""Networks and their files: DiT (``models.dit``), checkpoints, position embedding, codecs (``models.vae``).

``models.vae`` imports diffusers lazily; import it directly when a codec is needed.
"""

from models.dit import DIT_CONFIGS, DiT, DiT_models

__all__ = ["DIT_CONFIGS", "DiT", "DiT_models"]
