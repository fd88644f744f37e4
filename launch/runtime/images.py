"""ADM's image preprocessing, shared by training data (models/) and reference batches (evaluation/).

Lives in the runtime layer so that neither package imports the other and loading training data does
not pull in Inception.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BOX_FACTOR = 2  # halve with a BOX filter while the short side is at least twice the target


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM preprocessing (guided-diffusion's center_crop_arr) -> uint8 [size, size, 3]."""
    image = image.convert("RGB")
    while min(image.size) >= BOX_FACTOR * size:
        image = image.resize(tuple(s // BOX_FACTOR for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]
