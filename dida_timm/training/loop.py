"""The epoch loop of domain-adaptation training: balanced source batches + cycled target batches."""
import itertools
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .step import UdaConfig, uda_step

__all__ = ['MultiViewModel', 'NonFiniteLossError', 'train_one_epoch']


class MultiViewModel(nn.Module):
    """Runs several input batches through one model in ONE module call (DDP needs one forward per step).

    Args:
        model: The classifier.
        joint: Concatenate the batches into one pass (shared batch statistics), else one pass each.
    """

    def __init__(self, model: nn.Module, joint: bool = True):
        super().__init__()
        self.model = model
        self.joint = joint

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.joint and len(inputs) > 1:
            return list(self.model(torch.cat(inputs)).split([len(x) for x in inputs]))
        return [self.model(x) for x in inputs]


class NonFiniteLossError(RuntimeError):
    """The loss, or the weights after an epoch, became NaN or infinite; the run stops before the weights are used or
    saved."""


def train_one_epoch(
        model: nn.Module,
        cfg: UdaConfig,
        source_loader: Iterable,
        target_loader: Optional[Iterable],
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        epoch: int = 0,
        update_offset: int = 0,
        ema_update_offset: Optional[int] = None,
        device: torch.device = torch.device('cpu'),
        autocast: Optional[Callable] = None,
        scaler=None,
        clip_grad: Optional[float] = None,
        ema=None,
        world_size: int = 1,
        progress: Optional[Callable[[Dict[str, float]], None]] = None,
) -> Dict[str, Optional[float]]:
    """Train `model` (a MultiViewModel, maybe DDP-wrapped) for one epoch; returns averaged metrics, and `lr`, the
    scheduled learning rate of the epoch's last update.

    `epoch` (0-based) names the epoch in messages; the scheduler is stepped to `update_offset + step + 1`.
    The EMA is told the run's global update count, `ema_update_offset + step` (default `update_offset`): timm's
    EMA copies the weights outright at its first two steps, so a count restarting each epoch would reset it.
    With `world_size > 1`, every rank ends the epoch with rank 0's buffers (BatchNorm statistics), the EMA's too.

    Raises:
        NonFiniteLossError: naming the epoch and step where the loss stopped being finite.
    """
    model.train()
    ema_update_offset = update_offset if ema_update_offset is None else ema_update_offset
    sums: Dict[str, float] = {}
    steps = 0
    targets = target_loader if target_loader is not None else iter(lambda: None, 0)
    for step, (source_batch, target_batch) in enumerate(zip(source_loader, targets)):
        source = [t.to(device, non_blocking=True) for t in source_batch]
        # the source set yields (weak, strong, label) for the 'source+target' stream in every phase, and a
        # source-only phase of such a run has no use for the strong view
        source_weak, source_labels = source[0], source[-1]
        source_strong = source[1] if cfg.needs_source_strong else None
        kwargs = {}
        if target_batch is not None:
            weak, strong, target_labels = (t.to(device, non_blocking=True) for t in target_batch)
            kwargs = dict(target_weak=weak, target_strong=strong, target_labels=target_labels)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            out = uda_step(model, cfg, source_weak, source_labels, source_strong=source_strong, **kwargs)
        loss = out['loss']
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f'loss is {loss.item()} at epoch {epoch + 1}, step {step}; stopping before '
                                     f'the weights are saved (the last checkpoint is the last good state)')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if ema is not None:
            ema.update(model.module.model if hasattr(model, 'module') else model.model,
                       step=ema_update_offset + step)
        # the learning rate this update used, as the schedule gives it (before a group's lr_scale and before the
        # scheduler moves it on to the next update)
        group = optimizer.param_groups[0]
        lr = group['lr'] / group.get('lr_scale', 1.0)
        if scheduler is not None:
            scheduler.step_update(num_updates=update_offset + step + 1)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        steps += 1
        if progress is not None:
            shown = {k: v / steps for k, v in sums.items() if k not in ('pseudo_kept', 'pseudo_correct')}
            if sums.get('pseudo_kept'):
                shown['pseudo_acc'] = sums['pseudo_correct'] / sums['pseudo_kept']
            progress(shown)
    # a finite loss can still take an update to inf (too high an lr): the evaluation after the epoch would score, and
    # a checkpoint keep, weights that are not numbers
    weights = list(model.parameters()) + (list(ema.parameters()) if ema is not None else [])
    if weights and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in weights]).all()):
        raise NonFiniteLossError(f'the weights are not finite after epoch {epoch + 1}, though its losses were (an '
                                 'update overflowed: too high a learning rate?); stopping before they are used or '
                                 'saved (the last checkpoint is the last good state)')
    metrics = torch.tensor([sums.get(k, 0.0) for k in _KEYS] + [steps], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(metrics)
        # DDP averages the gradients only: each rank's running statistics followed its own batches, so its evaluation
        # would disagree with the other ranks' and with the checkpoint rank 0 saves
        for buffer in itertools.chain(model.buffers(), ema.buffers() if ema is not None else ()):
            dist.broadcast(buffer, src=0)
    totals = dict(zip(_KEYS + ['steps'], metrics.tolist()))
    n = max(totals['steps'], 1)
    result = {k: totals[k] / n for k in ('loss', 'source_loss', 'unlabelled_loss', 'keep_rate') if k in sums}
    if steps:
        result['lr'] = lr
    if 'pseudo_kept' in sums:
        # undefined, not zero, when no pseudo-label was kept; None is what JSON and the CSV can carry
        result['pseudo_accuracy'] = (totals['pseudo_correct'] / totals['pseudo_kept'] if totals['pseudo_kept'] > 0
                                     else None)
    return result


_KEYS = ['loss', 'source_loss', 'unlabelled_loss', 'keep_rate', 'pseudo_kept', 'pseudo_correct']
