"""``scar``: CutPaste-Scar (Li et al. 2021).

A thin rectangle, width U(2, 16) px and length U(10, 25) px at 256 px scale (scaled with the
image), cut at a uniform location, colour-jittered, rotated U(-45, 45) degrees and pasted, as
CutPaste, wholly inside the image.
"""
from __future__ import annotations

import numpy as np

from .cutpaste import CutPaste
from .patch import Cut
from .placement import sample_point
from .registry import Scene, register


@register("scar")
class Scar(CutPaste):
    def cut(self, scene: Scene, rng: np.random.Generator) -> Cut:
        s = scene.shape[1] / 256.0
        size = (max(2, int(round(rng.uniform(10, 25) * s))), max(2, int(round(rng.uniform(2, 16) * s))))
        center = sample_point(None, rng, scene.shape)
        return Cut(size, center, angle=rng.uniform(-45, 45))
