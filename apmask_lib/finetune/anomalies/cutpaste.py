"""``cutpaste``: CutPaste (Li et al. 2021), "CutPaste (normal)".

A rectangle of area ratio U(0.02, 0.15) and aspect ratio log-U(0.3, 3.3) is cut from the same
image (or ``source``) at a uniform location, colour-jittered and pasted at a uniform location
fully inside the image (:func:`~apmask_lib.finetune.anomalies.placement.inside_center`).
"""
from __future__ import annotations

import math

import numpy as np

from .patch import Cut, PatchKind
from .placement import inside_center, sample_point
from .registry import Scene, register


@register("cutpaste")
class CutPaste(PatchKind):
    def cut(self, scene: Scene, rng: np.random.Generator) -> Cut:
        H, W = scene.shape
        area = rng.uniform(0.02, 0.15) * H * W
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        size = (max(2, int(round(math.sqrt(area / aspect)))), max(2, int(round(math.sqrt(area * aspect)))))
        return Cut(size, sample_point(None, rng, scene.shape))

    def paste_center(self, scene: Scene, rng: np.random.Generator, patch_shape: tuple[int, int]):
        """CutPaste pastes the whole rectangle inside the image: centre uniform over valid positions."""
        return inside_center(rng, patch_shape, scene.shape)
