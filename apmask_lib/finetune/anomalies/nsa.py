"""``nsa``: Natural Synthetic Anomalies (Schlüter et al. 2022).

A patch (sides ``patch_range`` of the image's) cut from ANOTHER normal image of the class
(``source``), randomly rescaled (``scale_range``), moved to a new location (inside
``object_mask`` when given) and Poisson-blended (``cv2.seamlessClone``), always: blending is NSA's
definition, so there is no retry without it.
"""
from __future__ import annotations

import numpy as np

from .patch import Cut, PatchKind
from .placement import patch_sizes, sample_point
from .registry import Scene, register


@register("nsa")
class NSA(PatchKind):
    needs_source = True
    always_poisson = True

    def cut(self, scene: Scene, rng: np.random.Generator) -> Cut:
        size = patch_sizes(rng, scene.shape, scene.patch_range)
        center = sample_point(scene.src_dist, rng, scene.shape)
        return Cut(size, center, scale=rng.uniform(*scene.scale_range))
