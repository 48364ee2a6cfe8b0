"""FixMatch pseudo-label loss, as DIDA-Net trains on the unlabelled target (docs/METHOD.md section 3).

`FixMatch` - https://arxiv.org/abs/2001.07685; DIDA-Net - https://arxiv.org/abs/2203.05028 (Eq. 8).

The weak view's prediction (no gradient) gives a pseudo-label; the strong view is trained towards it where
the prediction is confident (probability >= tau), or weighted by that probability (the paper's DomainNet
variant). The loss is averaged over every unlabelled image, kept or not: over the target batch B in the
paper, over K*B + B when source images join the unlabelled stream as in the authors' released code.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['PseudoLabels', 'pseudo_label', 'fixmatch_loss']


@dataclass
class PseudoLabels:
    """Pseudo-labels of a batch and the weight each gets in the loss."""
    labels: torch.Tensor  # [N] argmax of the weak view
    confidence: torch.Tensor  # [N] its probability
    weight: torch.Tensor  # [N] 0/1 mask, or the confidence when soft


def pseudo_label(weak_logits: torch.Tensor, threshold: float = 0.95, soft: bool = False) -> PseudoLabels:
    """Pseudo-labels from the weak view's logits (detached).

    Args:
        weak_logits: [N, C] logits of the weak view.
        threshold: Keep a pseudo-label when its probability >= threshold (hard mask).
        soft: Weight every pseudo-label by its probability instead of masking (DomainNet variant).
    """
    probs = weak_logits.detach().float().softmax(-1)
    confidence, labels = probs.max(-1)
    weight = confidence if soft else (confidence >= threshold).float()
    return PseudoLabels(labels, confidence, weight)


def fixmatch_loss(
        strong_logits: torch.Tensor,
        weak_logits: torch.Tensor,
        threshold: float = 0.95,
        soft: bool = False,
        pseudo: Optional[PseudoLabels] = None,
) -> torch.Tensor:
    """Masked (or confidence-weighted) cross-entropy of the strong view against the weak view's pseudo-labels.

    Args:
        strong_logits: [N, C] logits of the strong view.
        weak_logits: [N, C] logits of the weak view (no gradient flows into them).
        threshold: Confidence threshold tau.
        soft: Confidence weighting instead of the hard mask.
        pseudo: Precomputed pseudo-labels of `weak_logits`, if the caller already has them.

    Returns:
        Scalar loss: sum of weighted per-image losses divided by N (every unlabelled image counts).
    """
    pseudo = pseudo or pseudo_label(weak_logits, threshold, soft)
    per_image = F.cross_entropy(strong_logits.float(), pseudo.labels, reduction='none')
    return (per_image * pseudo.weight).sum() / max(len(per_image), 1)
