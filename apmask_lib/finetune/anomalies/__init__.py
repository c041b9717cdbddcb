"""Synthetic anomalies for fine-tuning: the paper's attention-guided cut-paste and four baselines.

One generator, :func:`make_anomaly`, whose ``kind`` names a recipe in the registry
(:mod:`.registry`); everything else is a parameter (Poisson blending, blend mode, patch sizes, the
visibility threshold ...). One module per kind, each written from its paper's description:

===============  ============================================================================
kind             recipe (module)
===============  ============================================================================
``attention``    the paper's (Sec. 3.2): cut around and paste at draws from the image's [CLS]
                 attention, rescaled and rotated (:mod:`.attention`)
``cutpaste``     CutPaste (normal), Li et al. 2021 (:mod:`.cutpaste`)
``scar``         CutPaste-Scar: a thin rotated rectangle (:mod:`.scar`)
``nsa``          Natural Synthetic Anomalies, Schlüter et al. 2022: a patch of another normal
                 image, Poisson-blended always (:mod:`.nsa`)
``fpi``          Foreign Patch Interpolation, Tan et al. 2020: a convex combination with
                 another image inside a rectangle (:mod:`.fpi`)
===============  ============================================================================

A sixth kind is one new module with an ``@register("name")`` class (:mod:`.registry`), imported
below. Shared parts: where patches go (:mod:`.placement`: attention and object-mask distributions,
boxes, rotation, placement), their colour (:mod:`.photometry`: jitter, augmentation of normal
images), blending (:mod:`.blending`), the cut-paste recipe four kinds share (:mod:`.patch`), and
the visibility rules and retries (:mod:`.generate`).

Poisson blending (``poisson=True``; :func:`poisson_paste`) uses ``cv2.seamlessClone`` with
``NORMAL_CLONE`` (objects) or ``MIXED_CLONE`` (textures, chest X-rays). 8-bit grayscale input
(2-D, or 3-channel with equal channels) is cloned as 3 channels and returned grayscale.

**No invisible anomalies** (:mod:`.generate`): a candidate whose footprint changed by less than
``min_mean_diff`` on average is redrawn, and footprint pixels that changed by at most ``pixel_tol``
are restored, so the returned mask is *exactly* the set of changed pixels and label 1 always
means a visible change.

Images are RGB uint8 (H, W, 3) (or grayscale (H, W)); masks are bool (H, W). Randomness comes
only from the ``rng`` argument (``numpy.random.Generator``), so a seed fixes the output.
"""
from __future__ import annotations

from ...config import ANOMALY_KINDS as KINDS
from .blending import BLENDS, poisson_paste
from .generate import MIN_MEAN_DIFF, PIXEL_TOL, anomaly_batch, make_anomaly
from .photometry import augment_normal, color_jitter, is_gray
from .placement import attention_distribution, mask_distribution, place, sample_point, transform_patch
from .registry import (REGISTRY, AnomalyKind, Scene, get_kind, needs_attention, needs_source, register,
                       registered_kinds)
# the built-in kinds, registered in the order of config.ANOMALY_KINDS
from . import attention, cutpaste, scar, nsa, fpi  # noqa: E402,F401  (import = registration)

__all__ = ["KINDS", "BLENDS", "MIN_MEAN_DIFF", "PIXEL_TOL", "attention_distribution", "sample_point",
           "mask_distribution", "is_gray", "color_jitter", "augment_normal", "transform_patch", "place",
           "poisson_paste", "make_anomaly", "anomaly_batch",
           "AnomalyKind", "Scene", "REGISTRY", "register", "registered_kinds", "get_kind", "needs_source",
           "needs_attention"]
