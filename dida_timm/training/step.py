"""One domain-adaptation training step: supervised source loss + FixMatch on the unlabelled stream.

DIDA-Net (https://arxiv.org/abs/2203.05028) trains with L = L_s + L_t and nothing else: cross-entropy on the
labelled source images and a FixMatch loss on unlabelled images, no domain labels, no alignment loss.

Two choices the paper and the authors' released code (Dassl) make differently are options here:
- `unlabelled_stream`: 'target' (paper Eq. 8, the default: the loss is about the domain we adapt to, and
  no strong view of the source is needed) or 'source+target' (released code: source images are also
  pseudo-labelled, the loss averaged over K*B + B).
- `forward_mode`: 'joint' (the default: source, weak-target and strong-target images in ONE forward pass,
  one set of batch statistics, as the original FixMatch) or 'separate' (released code, three passes in training
  mode, each view with its own batch statistics: pseudo-labels from a no-grad pass over the unlabelled stream's
  weak views, the supervised pass over the source, the pass over the strong views). Measured on the offline
  digits (5 targets x 3 seeds, docs/RESULTS.md) neither is better on average; they fail on different targets
  (the joint pass can collapse, the separate passes can fail to adapt), so the default stays FixMatch's.
- `pseudo_label_dropout` (separate mode only): the released code's no-grad pass runs in training mode, so dropout
  perturbs the pseudo-labels; off, that pass runs with every layer in evaluation mode except the normalisation
  layers (which keep using and updating batch statistics, as in the other passes).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fixmatch import fixmatch_loss, pseudo_label

__all__ = ['UdaConfig', 'uda_step', 'stochastic_layers_off']


@dataclass
class UdaConfig:
    """How a step computes its loss.

    Attributes:
        method: 'fixmatch' (DIDA-Net's recipe) or 'source_only' (supervised on the source alone).
        threshold: Pseudo-label confidence threshold tau.
        soft_weighting: Weight pseudo-labels by confidence instead of the hard mask (DomainNet variant).
        unlabelled_stream: 'target' or 'source+target'.
        forward_mode: 'joint' or 'separate'.
        unlabelled_weight: Weight of the unlabelled loss (1 in the paper).
        pseudo_label_dropout: Keep dropout (and every other train-time layer but normalisation) active in the
            pseudo-label pass; only 'separate' has a pass of its own to turn it off in.
    """
    method: str = 'fixmatch'
    threshold: float = 0.95
    soft_weighting: bool = False
    unlabelled_stream: str = 'target'
    forward_mode: str = 'joint'
    unlabelled_weight: float = 1.0
    pseudo_label_dropout: bool = True

    def __post_init__(self):
        choices = dict(method=('fixmatch', 'source_only'), unlabelled_stream=('target', 'source+target'),
                       forward_mode=('joint', 'separate'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {getattr(self, name)!r}')
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f'threshold must be in [0, 1], got {self.threshold}')
        if not self.pseudo_label_dropout and self.forward_mode == 'joint':
            raise ValueError("pseudo_label_dropout=False needs forward_mode='separate': the joint pass computes the "
                             'pseudo-labels in the same pass as the strong views, with dropout')

    @property
    def needs_source_strong(self) -> bool:
        return self.method == 'fixmatch' and self.unlabelled_stream == 'source+target'


@contextmanager
def stochastic_layers_off(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for every layer but batch normalisation (dropout, drop path, MixStyle off; batch statistics
    still used and tracked) inside the block; every module's mode is restored after it."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m, training in modes.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = training
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def uda_step(
        model: nn.Module,
        cfg: UdaConfig,
        source: torch.Tensor,
        source_labels: torch.Tensor,
        target_weak: Optional[torch.Tensor] = None,
        target_strong: Optional[torch.Tensor] = None,
        source_strong: Optional[torch.Tensor] = None,
        target_labels: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Compute the step's loss (not its backward) and detached diagnostics.

    Args:
        model: Maps a list of input batches to a list of logits (`MultiViewModel`, whose `joint` flag must
            match `cfg.forward_mode`), in training mode. 'joint' calls it once; 'separate' calls it twice, first
            under `torch.no_grad()` for the pseudo-labels.
        cfg: Loss configuration.
        source: Weak view of the K*B labelled source images.
        source_labels: Their labels.
        target_weak: Weak view of the B unlabelled target images (fixmatch).
        target_strong: Their strong view (fixmatch).
        source_strong: Strong view of the source images ('source+target' stream).
        target_labels: Target labels, ONLY for the pseudo-label accuracy diagnostic (never in the loss);
            negative where unknown.

    Returns:
        'loss' (with grad), and detached 'source_loss', 'unlabelled_loss', 'keep_rate' (kept share of the
        target pseudo-labels), 'pseudo_correct' / 'pseudo_kept' (counts on target images with known labels).
    """
    if cfg.method == 'source_only':
        loss = F.cross_entropy(model([source])[0].float(), source_labels)
        return dict(loss=loss, source_loss=loss.detach())
    if target_weak is None or target_strong is None:
        raise ValueError('fixmatch needs the weak and strong views of the target batch')
    with_source = cfg.unlabelled_stream == 'source+target'
    if with_source and source_strong is None:
        raise ValueError("unlabelled_stream='source+target' needs the strong view of the source batch")

    if cfg.forward_mode == 'separate':
        # the released code's three passes, all in training mode: pseudo-labels from a no-grad pass over the
        # unlabelled stream's weak views, then the supervised pass, then the pass over the strong views (the
        # last two in one module call: DDP allows one forward with gradients per step)
        weak = torch.cat([source, target_weak]) if with_source else target_weak
        with torch.no_grad(), nullcontext() if cfg.pseudo_label_dropout else stochastic_layers_off(model):
            weak_logits = model([weak])[0]
        source_logits, strong_logits = model(
            [source, torch.cat([source_strong, target_strong]) if with_source else target_strong])
    else:
        inputs = [source, target_weak, target_strong] + ([source_strong] if with_source else [])
        logits = model(inputs)
        source_logits, weak_logits, strong_logits = logits[:3]
        if with_source:
            weak_logits = torch.cat([source_logits, weak_logits])
            strong_logits = torch.cat([logits[3], strong_logits])
    source_loss = F.cross_entropy(source_logits.float(), source_labels)
    pseudo = pseudo_label(weak_logits, cfg.threshold, cfg.soft_weighting)
    unlabelled_loss = fixmatch_loss(strong_logits, weak_logits, pseudo=pseudo)

    n_target = len(target_weak)
    target_pseudo = pseudo.labels[-n_target:]
    kept = pseudo.weight[-n_target:] > 0  # the hard mask, or (soft weighting) every pseudo-label
    out = dict(
        loss=source_loss + cfg.unlabelled_weight * unlabelled_loss,
        source_loss=source_loss.detach(),
        unlabelled_loss=unlabelled_loss.detach(),
        keep_rate=kept.float().mean(),
    )
    if target_labels is not None:
        known = target_labels >= 0
        out['pseudo_kept'] = (kept & known).sum()
        out['pseudo_correct'] = (kept & known & (target_pseudo == target_labels)).sum()
    return out
