"""The cut-paste recipe that four kinds share (``attention``, ``cutpaste``, ``scar``, ``nsa``):
cut a box of the source (``source``, else the image itself), colour-jitter it, rescale and rotate
it, place it, and paste or Poisson-blend it in. A kind says only how it cuts (:meth:`PatchKind.cut`)
and, where not by the paste distribution, where it pastes (:meth:`PatchKind.paste_center`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .blending import paste
from .photometry import color_jitter
from .placement import crop_box, place, sample_point, transform_patch
from .registry import AnomalyKind, Candidate, Scene


@dataclass(frozen=True)
class Cut:
    """Where and how a patch is cut: box ``size`` (h, w) around ``center`` (y, x) of the source,
    then rescaled by ``scale`` and rotated by ``angle`` degrees."""

    size: tuple[int, int]
    center: tuple[int, int]
    scale: float = 1.0
    angle: float = 0.0


class PatchKind(AnomalyKind):
    """A kind that cuts a patch and pastes it elsewhere (module docstring)."""

    def cut(self, scene: Scene, rng: np.random.Generator) -> Cut:
        raise NotImplementedError

    def paste_center(self, scene: Scene, rng: np.random.Generator, patch_shape: tuple[int, int]) -> Optional[tuple[int, int]]:
        """Centre (y, x) of the paste, or None when the patch cannot go anywhere: by default a draw
        from the paste distribution (uniform when there is none)."""
        return sample_point(scene.dist, rng, scene.shape)

    def propose(self, scene: Scene, rng: np.random.Generator, poisson: bool) -> Candidate:
        src = scene.image if scene.source is None else scene.source
        c = self.cut(scene, rng)
        y0, x0, h, w = crop_box(c.center, c.size, scene.shape)
        patch = color_jitter(src[y0:y0 + h, x0:x0 + w], rng, scene.jitter, gray=scene.gray)
        patch, pfoot = transform_patch(patch, c.angle, c.scale)
        center = self.paste_center(scene, rng, pfoot.shape)
        if center is None:
            return None
        canvas, foot = place(patch, pfoot, center, scene.shape)
        if not foot.any():
            return None
        return paste(scene.image, canvas, foot, poisson, scene.blend)


__all__ = ["Cut", "PatchKind"]
