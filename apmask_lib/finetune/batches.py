"""Fine-tuning's data (paper Sec. 3.2): the training images decoded once, the initial backbone's
attention maps, and the synthetic-anomaly batches, each a pure function of (seed, step), made in
DataLoader worker processes. Used by :mod:`apmask_lib.finetune.stage`."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .anomalies import anomaly_batch, needs_attention, needs_source
from ..models import VisionTransformer
from ..core.devices import autocast_context


def load_train_images(dataset, samples: Sequence, size: int, num_workers: int = 2, progress: bool = True) -> np.ndarray:
    """Decode and resize the training images once: uint8 (N, size, size, 3). Threads (OpenCV
    releases the GIL)."""
    from ..data import resize_image

    def load(s):
        return resize_image(dataset.image(s), size)

    with ThreadPoolExecutor(max(1, num_workers)) as ex:
        imgs = list(tqdm(ex.map(load, samples), total=len(samples), desc="load images",
                         disable=not progress or len(samples) < 2, leave=False))
    return np.stack(imgs)


@torch.no_grad()
def attention_maps(backbone: VisionTransformer, images: np.ndarray, device: torch.device, batch_size: int = 32,
                   progress: bool = True) -> np.ndarray:
    """Mean [CLS] attention (Eq. 2) of every image under ``backbone``: float32 (N, h, w)."""
    backbone.eval()
    autocast = autocast_context(device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="attention maps", disable=not progress, leave=False):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        with autocast:
            out.append(backbone.saliency(x).float().cpu())
    return torch.cat(out).numpy()


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class SyntheticBatches(Dataset):
    """Map-style dataset whose item ``t`` is training batch ``t`` (a pure function of (seed, t)).

    images: uint8 (N, H, W, 3) normal training images; attentions: (N, h, w) or None.
    Item: {"images": uint8 (B, 3, H, W), "masks": bool (B, H, W), "labels": float32 (B,)}.
    """

    def __init__(self, images: np.ndarray, attentions: Optional[np.ndarray], batch_size: int, seed: int,
                 kind: str = "attention", fraction: float = 0.5, hflip: float = 0.5, normal_jitter: float = 0.05,
                 **anomaly_kwargs):
        # torch tensors: pickled to spawned workers through shared memory, not copied
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.attentions = None if attentions is None else torch.from_numpy(np.ascontiguousarray(attentions))
        self.n = len(images)
        self.batch_size, self.seed = batch_size, seed
        self.kind, self.fraction = kind, fraction
        self.hflip, self.normal_jitter = hflip, normal_jitter
        self.kwargs = anomaly_kwargs
        self.steps_per_epoch = max(1, self.n // batch_size)  # drop_last; images repeat within a batch when n < B
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)
        if needs_attention(kind) and attentions is None:
            raise ValueError(f"kind {kind!r} needs the attention maps of the training images")

    def indices(self, step: int) -> np.ndarray:
        """Image indices of batch ``step``: epoch permutation from (seed, epoch), tiled when N < B."""
        epoch, it = divmod(int(step), self.steps_per_epoch)
        if self._order[0] != epoch:
            rng = _seed(self.seed, 7919, epoch)
            reps = -(-self.steps_per_epoch * self.batch_size // self.n)
            self._order = (epoch, np.concatenate([rng.permutation(self.n) for _ in range(reps)]))
        return self._order[1][it * self.batch_size:(it + 1) * self.batch_size]

    def __len__(self) -> int:  # nominal; the sampler decides which steps are drawn
        return self.steps_per_epoch

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = _seed(self.seed, 104729, step)
        idx = self.indices(step)
        sources = None
        if needs_source(self.kind) and self.n > 1:
            other = rng.integers(0, self.n - 1, size=len(idx))
            other = other + (other >= idx)
            sources = [self.images[j].numpy() for j in other]
        atts = None if self.attentions is None else [self.attentions[i].numpy() for i in idx]
        ims, masks, labels = anomaly_batch([self.images[i].numpy() for i in idx], rng, self.kind, self.fraction,
                                           attentions=atts, sources=sources, hflip=self.hflip,
                                           normal_jitter=self.normal_jitter, **self.kwargs)
        return {"images": torch.from_numpy(ims).permute(0, 3, 1, 2).contiguous(),
                "masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels).float()}


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def batch_loader(batches: SyntheticBatches, start: int, stop: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Yields batches ``start .. stop-1`` in order (``num_workers`` processes, 0 = main process).

    Workers are *spawned*, not forked: a forked child inherits OpenCV's pthread pool (and torch's
    OpenMP pool) in a broken state once the parent has used them, and then hangs in its first
    parallel cv2 call (``cv2.setNumThreads``, ``resize``, ``seamlessClone``)."""
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = {"worker_init_fn": _worker_init, "prefetch_factor": 4, "multiprocessing_context": "spawn"}
    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                      pin_memory=pin_memory, **kw)


__all__ = ["load_train_images", "attention_maps", "SyntheticBatches", "batch_loader"]
