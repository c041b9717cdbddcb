"""The anomaly kinds by name: what a kind is (:class:`AnomalyKind`), what it is given
(:class:`Scene`) and the registry (:func:`register`, :func:`get_kind`).

A kind is one small class in its own module, registered under its name::

    @register("mykind")
    class MyKind(AnomalyKind):
        needs_source = True                 # source= another normal image is required
        def propose(self, scene, rng, poisson):
            ...                             # one candidate (image', footprint) or None
            return out, foot

:func:`~apmask_lib.finetune.anomalies.make_anomaly` (the visibility rules, the retries) and
:func:`~apmask_lib.finetune.anomalies.anomaly_batch` then serve it by name; nothing else changes.
(The configuration accepts the kinds of :data:`apmask_lib.config.ANOMALY_KINDS`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import numpy as np

from .placement import object_distribution

Candidate = Optional[tuple[np.ndarray, np.ndarray]]   # (image' uint8 (H, W, 3), footprint bool (H, W)) or None


@dataclass(frozen=True)
class Scene:
    """One :func:`make_anomaly` call, prepared: the image and source as RGB uint8 (H, W, 3) (the
    source resized to the image, grayscale when the image is), the paste and cut distributions
    (:meth:`AnomalyKind.distributions`; None = uniform) and the patch options."""

    image: np.ndarray
    source: Optional[np.ndarray]
    dist: Optional[np.ndarray]
    src_dist: Optional[np.ndarray]
    gray: bool
    blend: str
    patch_range: tuple[float, float]
    scale_range: tuple[float, float]
    max_angle: float
    jitter: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]


class AnomalyKind:
    """One recipe for synthetic anomalies. Subclasses set the flags and implement :meth:`propose`.

    needs_source:    ``make_anomaly`` refuses to run without ``source=``; ``anomaly_batch`` and the
                     training batches pick another normal image as the source.
    needs_attention: the kind places by the image's attention map (fine-tuning computes the maps).
    always_poisson:  Poisson-blended whatever ``poisson=`` says, and never retried without blending.
    """

    name: str = ""
    needs_source: bool = False
    needs_attention: bool = False
    always_poisson: bool = False

    def distributions(self, shape: tuple[int, int], *, attention: Optional[np.ndarray],
                      source_attention: Optional[np.ndarray], object_mask: Optional[np.ndarray],
                      has_source: bool, temperature: float) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(paste distribution, cut distribution) over ``shape`` (H, W); None = uniform. By default
        the paste centres follow ``object_mask`` when given, the cut is uniform."""
        return (None if object_mask is None else object_distribution(object_mask, shape)), None

    def propose(self, scene: Scene, rng: np.random.Generator, poisson: bool) -> Candidate:
        """One candidate (image', footprint) on ``scene``, blended when ``poisson``; None when this
        draw cannot be made (the caller draws again)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<anomaly kind {self.name!r}: {type(self).__name__}>"


#: name -> kind, in registration order (the built-in kinds: the order of ``config.ANOMALY_KINDS``)
REGISTRY: dict[str, AnomalyKind] = {}
K = TypeVar("K", bound=type)


def register(name: str) -> Callable[[K], K]:
    """Class decorator: register an :class:`AnomalyKind` subclass under ``name`` (once)."""
    def deco(cls: K) -> K:
        if not (isinstance(cls, type) and issubclass(cls, AnomalyKind)):
            raise TypeError(f"@register({name!r}) needs a subclass of AnomalyKind, got {cls!r}")
        if name in REGISTRY:
            raise ValueError(f"anomaly kind {name!r} is already registered ({type(REGISTRY[name]).__name__})")
        cls.name = name
        REGISTRY[name] = cls()
        return cls
    return deco


def registered_kinds() -> tuple[str, ...]:
    """The names of the registered kinds, in registration order."""
    return tuple(REGISTRY)


def get_kind(name: str) -> AnomalyKind:
    """The kind registered as ``name``; a ValueError naming the known kinds otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown anomaly kind {name!r}; choose from {', '.join(REGISTRY)}") from None


def needs_source(name: str) -> bool:
    """Whether kind ``name`` takes its patch from another normal image (``source=``)."""
    return get_kind(name).needs_source


def needs_attention(name: str) -> bool:
    """Whether kind ``name`` is placed by the image's attention map (``attention=``)."""
    return get_kind(name).needs_attention


__all__ = ["Candidate", "Scene", "AnomalyKind", "REGISTRY", "register", "registered_kinds", "get_kind",
           "needs_source", "needs_attention"]
