"""Networks and their files: DiT (``models.dit``), SiT and REPA's SiT (``models.sit``), checkpoints, position
embedding, codecs (``models.vae``).

``models.vae`` imports diffusers lazily; import it directly when a codec is needed.
"""

from models.dit import DIT_CONFIGS, DiT, DiT_models
from models.sit import SIT_CONFIGS, SiT, SiT_models

__all__ = ["DIT_CONFIGS", "SIT_CONFIGS", "DiT", "DiT_models", "SiT", "SiT_models"]
