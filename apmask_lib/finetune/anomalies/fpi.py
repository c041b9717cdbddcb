"""``fpi``: Foreign Patch Interpolation (Tan et al. 2020).

Inside a rectangle (sides ``patch_range`` of the image's, centred on a draw from the paste
distribution: ``object_mask`` when given, else uniform), the convex combination
x' = (1 - α) x + α x_src with α ~ U(0, 1) per patch and ``source`` another image, same location.
FPI's label is α per pixel; we use the binary footprint so that one Dice loss serves all kinds.
No blending (``poisson`` does not apply).
"""
from __future__ import annotations

import numpy as np

from .placement import crop_box, patch_sizes, sample_point
from .registry import AnomalyKind, Candidate, Scene, register


@register("fpi")
class FPI(AnomalyKind):
    needs_source = True

    def propose(self, scene: Scene, rng: np.random.Generator, poisson: bool) -> Candidate:
        image, source, shape = scene.image, scene.source, scene.shape
        h, w = patch_sizes(rng, shape, scene.patch_range)
        y0, x0, h, w = crop_box(sample_point(scene.dist, rng, shape), (h, w), shape)
        alpha = rng.uniform(0.0, 1.0)
        out = image.copy()
        blendv = (1 - alpha) * image[y0:y0 + h, x0:x0 + w].astype(np.float32) + alpha * source[y0:y0 + h, x0:x0 + w]
        out[y0:y0 + h, x0:x0 + w] = np.clip(np.rint(blendv), 0, 255).astype(np.uint8)
        foot = np.zeros(shape, bool)
        foot[y0:y0 + h, x0:x0 + w] = True
        return out, foot
