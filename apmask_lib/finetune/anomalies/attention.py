"""``attention``: the paper's attention-guided cut-paste (Bozorgtabar & Mahapatra 2023, Sec. 3.2).

The mean [CLS] attention of the *normal* image (Eq. 2; the caller passes it) is turned into a
sampling distribution (:func:`~apmask_lib.finetune.anomalies.placement.attention_distribution`). A
patch of width ~ U(0.1 W, 0.4 W) and height ~ U(0.1 H, 0.4 H) (``patch_range``) is cut around a
centre drawn from it (the salient region), colour-jittered, rescaled (``scale_range``), rotated
(``max_angle``) and pasted centred on a second draw from the same distribution. With a ``source``
image the cut comes from it, centred on a draw from ``source_attention`` (uniform without one).
``object_mask`` is ignored: the attention already plays that role.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .patch import Cut, PatchKind
from .placement import attention_distribution, patch_sizes, sample_point
from .registry import Scene, register


@register("attention")
class Attention(PatchKind):
    needs_attention = True

    def distributions(self, shape: tuple[int, int], *, attention: Optional[np.ndarray],
                      source_attention: Optional[np.ndarray], object_mask: Optional[np.ndarray],
                      has_source: bool, temperature: float):
        if attention is None:
            raise ValueError("kind 'attention' needs attention= the (h, w) mean [CLS] attention of the image")
        dist = attention_distribution(attention, shape, temperature)
        if not has_source:
            return dist, dist
        if source_attention is not None:
            return dist, attention_distribution(source_attention, shape, temperature)
        return dist, None

    def cut(self, scene: Scene, rng: np.random.Generator) -> Cut:
        size = patch_sizes(rng, scene.shape, scene.patch_range)
        center = sample_point(scene.src_dist, rng, scene.shape)
        scale = rng.uniform(*scene.scale_range)
        angle = rng.uniform(-scene.max_angle, scene.max_angle)
        return Cut(size, center, scale, angle)
