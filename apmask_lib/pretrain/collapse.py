"""Is SwAV-style pre-training collapsing? Per-step statistics of the assignments (no extra passes).

The pre-training loss is the cross-entropy H(q, p) = H(q) + KL(q ‖ p) of the Sinkhorn codes q of
the teacher and the student's prediction p = softmax(z_s·C/τ). A loss of ln K (K prototypes) can
mean two different things, which these statistics tell apart:

* **collapse**: the teacher's scores hardly differ between images (``teacher_spread`` → 0), so
  Sinkhorn's equal partition can only spread every image uniformly over the prototypes (codes
  entropy ``code_entropy`` → ln K) and the best the student can do is predict uniformly as well
  (``student_entropy`` → ln K);
* **learning**: the codes are peaked (``code_entropy`` well below ln K) and the student predicts
  them (``student_entropy`` falls, ``agreement`` of the arg-maxes rises), while all prototypes
  stay in use (``proto_perplexity`` near K: equal partition is what prevents collapse in SwAV).

All values are per-step means over the batch (and, for the student, over its views), returned as
detached device scalars so the caller decides when to read them back.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

STAT_COLUMNS = ("code_entropy", "student_entropy", "teacher_entropy", "teacher_spread", "proto_perplexity",
                "protos_used", "agreement")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies (nats) of probability rows (.., K)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


@torch.no_grad()
def assignment_stats(teacher_scores: torch.Tensor, codes: torch.Tensor, student_scores: Sequence[torch.Tensor],
                     temperature: float) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of one step (module docstring).

    teacher_scores: (B, K) teacher prototype scores z_t·Cᵀ (cosine similarities, in [-1, 1]).
    codes:          (B, K) per-sample Sinkhorn codes (rows sum to 1).
    student_scores: list of (V_i·B, K) student scores, views stacked view-major.
    Returns:
      code_entropy     mean entropy of the codes (ln K = uniform),
      student_entropy  mean entropy of softmax(z_s·C/τ) over views and images,
      teacher_entropy  mean entropy of the teacher's own softmax(z_t·C/τ),
      teacher_spread   std over the batch of each prototype's teacher score, averaged over prototypes
                       (0 = every image has the same scores),
      proto_perplexity exp(entropy of the batch-mean student prediction), in [1, K]: how many
                       prototypes the student's predictions use (K = all equally),
      protos_used      number of prototypes that are the arg-max code of at least one image,
      agreement        fraction of student views whose arg-max is their image's arg-max code.
    """
    codes = codes.float()
    B, K = codes.shape
    t = teacher_scores.float()
    s = torch.cat([x.float() for x in student_scores])
    p = F.softmax(s / temperature, dim=-1)
    target = codes.argmax(1).repeat(s.shape[0] // B)
    return {
        "code_entropy": _entropy(codes).mean(),
        "student_entropy": _entropy(p).mean(),
        "teacher_entropy": _entropy(F.softmax(t / temperature, dim=-1)).mean(),
        "teacher_spread": t.std(0, unbiased=False).mean(),
        "proto_perplexity": torch.exp(_entropy(p.mean(0))),
        "protos_used": torch.bincount(codes.argmax(1), minlength=K).gt(0).sum().float(),
        "agreement": (p.argmax(1) == target).float().mean(),
    }


__all__ = ["STAT_COLUMNS", "assignment_stats"]
