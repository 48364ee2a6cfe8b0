"""Label-free monitoring of an adaptation run: score every epoch's model without target labels, and keep the
weights of the checkpoint the selection rule picks.

Each epoch the model predicts a fixed held-out slice of the unlabelled target and of the source domains (never
trained on). The scores (`selection.label_free_scores`), the source validation accuracy and two accuracy
estimates (ATC, and COT on temperature-scaled predictions) go into the run's history; the probabilities (float64,
as they were scored: float32 rounds a maximum probability to 1.0 from a logit margin of about 17 on, float64 from
about 37, and ties move the ATC threshold) and the target's predicted classes are saved to
`label_free/epoch-NNNN.npz`, so that any score or rule can be recomputed after the run. The model at the start of
adaptation (the end of the source-only phase, or the starting weights) is the reference every candidate is compared
with and the fallback when the collapse guard fires; its weights and those of the currently selected epoch are kept
in `selection/`.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .checkpoint import replace_file, save_weights
from .evaluation import predict_probs
from .selection import (
    CollapseGuard, Selection, atc_estimate, cot_estimate, fit_atc_threshold, fit_atc_tie_share, fit_temperature,
    label_free_scores, select_checkpoint)

__all__ = ['LabelFreeMonitor']


class LabelFreeMonitor:
    """Scores epochs on held-out slices and tracks the selected checkpoint of one run.

    Args:
        out_dir: The run folder (None: keep nothing on disk).
        write: Write to `out_dir` (rank 0 only; the other ranks read what it wrote).
        target_val: Held-out unlabelled target images with the test transform (labels, if any, are never read
            by a score).
        source_val: Held-out labelled source images with the test transform.
        label_share: [C] share of each class among the source labels: the label marginal COT assumes for the
            target.
        rule: Selection rule (a key of `selection.RULES`).
        guard: Collapse guard of the guarded rules.
        atc_score: Confidence score of ATC ('max_prob' or 'neg_entropy').
        pseudo_label_threshold: FixMatch's tau (0 under soft weighting, which keeps every pseudo-label).
        batch_size: Evaluation batch size.
        device: Device of the model.
    """

    def __init__(
            self,
            out_dir: Optional[Path],
            write: bool,
            target_val: Dataset,
            source_val: Dataset,
            label_share: torch.Tensor,
            rule: str = 'guarded_last',
            guard: Optional[CollapseGuard] = None,
            atc_score: str = 'max_prob',
            pseudo_label_threshold: float = 0.95,
            batch_size: int = 256,
            device: torch.device = torch.device('cpu'),
    ):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.write = write and out_dir is not None
        self.target_val = target_val
        self.source_val = source_val
        self.rule = rule
        self.guard = guard or CollapseGuard()
        self.atc_score = atc_score
        self.pseudo_label_threshold = pseudo_label_threshold
        self.batch_size = batch_size
        self.device = device
        self.label_share = label_share
        self.reference_epoch: Optional[int] = None
        self.reference_predictions: Optional[torch.Tensor] = None
        # (epoch, target predictions) of the last score() call, so the reference needs no second pass
        self._scored: Optional[Tuple[int, torch.Tensor]] = None
        if self.write:
            (self.out_dir / 'label_free').mkdir(parents=True, exist_ok=True)
            (self.out_dir / 'selection').mkdir(parents=True, exist_ok=True)

    def _dump(self, epoch: int) -> Optional[Path]:
        return self.out_dir / 'label_free' / f'epoch-{epoch:04d}.npz' if self.out_dir is not None else None

    def score(self, model: nn.Module, epoch: int) -> Dict[str, float]:
        """Label-free scores of `model` after `epoch` (agreement only once a reference is set)."""
        target_probs, target_labels = predict_probs(model, self.target_val, self.batch_size, self.device)
        source_probs, source_labels = predict_probs(model, self.source_val, self.batch_size, self.device)
        threshold = fit_atc_threshold(source_probs, source_labels, self.atc_score)
        tie_share = fit_atc_tie_share(source_probs, source_labels, threshold, self.atc_score)
        temperature = fit_temperature(source_probs, source_labels)
        self._scored = (epoch, target_probs.argmax(-1))
        row = dict(
            source_val_accuracy=float((source_probs.argmax(-1) == source_labels).double().mean() * 100),
            **label_free_scores(target_probs, self.reference_predictions, self.pseudo_label_threshold),
            atc_threshold=threshold,
            atc_tie_share=tie_share,
            estimated_accuracy=atc_estimate(target_probs, threshold, self.atc_score, tie_share),
            temperature=temperature,
            cot_estimated_accuracy=cot_estimate(target_probs, self.label_share, temperature),
        )
        if self.write:
            # runs before 2026-12-04 stored float16 probabilities, before 2026-12-05 float32 ones: rounding ties
            # close ones
            np.savez_compressed(
                self._dump(epoch), target_probs=target_probs.numpy(), target_labels=target_labels.numpy(),
                source_probs=source_probs.numpy(), source_labels=source_labels.numpy(),
                target_predictions=self._scored[1].numpy())
        return row

    def set_reference(self, model: nn.Module, epoch: int, row: Dict[str, float]) -> None:
        """Make `model` (the state after `epoch`, whose scores are `row`) the source-only reference."""
        self.reference_epoch = epoch
        if self._scored is not None and self._scored[0] == epoch:
            self.reference_predictions = self._scored[1]
        else:  # resumed right after that epoch: not scored by this process
            self.reference_predictions = predict_probs(model, self.target_val, self.batch_size, self.device)[0].argmax(-1)
        row['agreement'] = 100.0
        if self.write:
            save_weights(model, self.out_dir / 'selection' / 'reference.safetensors')

    def restore_reference(self, epoch: int) -> None:
        """On resume: the reference's predictions, read back from its saved predicted classes."""
        dump = self._dump(epoch)
        if dump is None or not dump.exists():
            raise FileNotFoundError(f'cannot resume the label-free scores: {dump} (the reference epoch) is missing')
        self.reference_epoch = epoch
        with np.load(dump) as saved:
            if 'target_predictions' in saved.files:
                self.reference_predictions = torch.from_numpy(saved['target_predictions'])
            else:  # a run started before the classes were saved: what it used itself
                self.reference_predictions = torch.from_numpy(saved['target_probs']).float().argmax(-1)

    def candidates(self, history: List[Dict]) -> List[Dict]:
        """The reference row and every later row of `history`."""
        if self.reference_epoch is None:
            return []
        return [h for h in history if h['epoch'] >= self.reference_epoch]

    def select(self, history: List[Dict]) -> Selection:
        """The rule's choice among the candidates of `history`."""
        return select_checkpoint(self.candidates(history), self.rule, self.guard)

    def update(self, model: nn.Module, history: List[Dict]) -> Selection:
        """Re-run the rule after the newest epoch of `history`; keep its weights if the rule now picks it.

        The rules maximise a per-epoch key among the candidates the guard passes, so the running choice only
        changes to the newest epoch, whose weights are in `model` now.
        """
        selection = self.select(history)
        newest = history[-1]['epoch']
        if self.write and selection.epoch == newest and newest != self.reference_epoch:
            save_weights(model, self.out_dir / 'selection' / 'selected.safetensors')
            replace_file(self.out_dir / 'selection' / 'selected.json',
                         lambda tmp: tmp.write_text(json.dumps(dict(epoch=newest))))
        return selection

    def selected_weights(self, selection: Selection) -> Dict[str, torch.Tensor]:
        """The state dict of the selected epoch (the reference's or the kept copy)."""
        folder = self.out_dir / 'selection'
        if selection.epoch == self.reference_epoch:
            return safetensors.torch.load_file(str(folder / 'reference.safetensors'))
        kept = json.loads((folder / 'selected.json').read_text())['epoch']
        if kept != selection.epoch:
            raise RuntimeError(f'the selected epoch is {selection.epoch} but {folder} keeps epoch {kept}')
        return safetensors.torch.load_file(str(folder / 'selected.safetensors'))
