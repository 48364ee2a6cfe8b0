"""Label-free model selection: scores of an unlabelled target, an accuracy estimate and a collapse guard.

Adapting to a domain without labels leaves the user blind: self-training can make a model confidently worse
than its source-only start (a class swap or a partial collapse of the predicted classes). Published benchmarks
of label-free validators (Musgrave et al., "Benchmarking validation methods for unsupervised domain
adaptation", 2022; SKADA-Bench, 2024) find that no single target-only score is safe: prediction entropy
rewards collapse, information maximisation (IM) and batch nuclear-norm maximisation (BNM) penalise full but not
partial collapse. Only a comparison with the source-only model sees a collapse for what it is, so the guard
here compares every candidate with that model (its class histogram and its predictions).

Every function is pure: probabilities in, numbers out, so each is testable on hand-made tensors.

- `label_free_scores`: entropy, entropy of the mean, IM, BNM, effective classes, dead classes, agreement with
  the source-only model, pseudo-label keep share and balance on a held-out slice of the target.
- `fit_atc_threshold` / `fit_atc_tie_share` / `atc_estimate`: average thresholded confidence (ATC, Garg et al.,
  "Leveraging unlabeled data to predict out-of-distribution performance", ICLR 2022): the threshold at which the
  share of source validation images scoring above it equals their accuracy (images tied at it counted in part); the
  target's share above it estimates accuracy.
- `fit_temperature` / `cot_estimate`: confidence optimal transport (COT, Lu et al., "Characterizing
  out-of-distribution error via optimal transport", NeurIPS 2023) on predictions temperature-scaled on the source
  validation images (Guo et al., "On calibration of modern neural networks", ICML 2017). Unlike ATC it charges a
  model that predicts some classes far more often than the labels occur, the signature of a collapse.
- `CollapseGuard` and `select_checkpoint`: which epoch a run reports, exports and ships.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'ATC_SCORES', 'COT_MAX_IMAGES', 'LABEL_FREE_KEYS', 'RULES', 'CollapseGuard', 'Selection', 'atc_estimate',
    'atc_score', 'cot_estimate', 'fit_atc_threshold', 'fit_atc_tie_share', 'fit_temperature', 'label_free_scores',
    'select_checkpoint',
]

# a class predicted for fewer than this share of the images counts as dead
DEAD_CLASS_SHARE = 0.01

ATC_SCORES = ('max_prob', 'neg_entropy')

# the per-epoch history keys this module writes
LABEL_FREE_KEYS = (
    'source_val_accuracy', 'mean_confidence', 'mean_entropy', 'entropy_of_mean', 'information_maximization', 'bnm',
    'effective_classes', 'dead_classes', 'pseudo_keep_share', 'pseudo_effective_classes', 'agreement',
    'atc_threshold', 'atc_tie_share', 'estimated_accuracy', 'temperature', 'cot_estimated_accuracy')

# COT solves an assignment whose cost grows with the cube of the images: larger sets are estimated on a sample
COT_MAX_IMAGES = 2000


def _entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def effective_classes(labels: torch.Tensor, num_classes: int) -> float:
    """exp(entropy of the histogram of `labels`): C for a uniform spread, 1 when every label is the same."""
    if len(labels) == 0:
        return 0.0
    hist = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    return float(_entropy(hist).exp())


def dead_classes(labels: torch.Tensor, num_classes: int) -> int:
    """Classes given to fewer than DEAD_CLASS_SHARE of the images."""
    hist = torch.bincount(labels, minlength=num_classes).double() / max(len(labels), 1)
    return int((hist < DEAD_CLASS_SHARE).sum())


def atc_score(probs: torch.Tensor, score: str = 'max_prob') -> torch.Tensor:
    """Per-image confidence score of ATC: the maximum probability, or the negative entropy."""
    if score == 'max_prob':
        return probs.max(-1).values
    if score == 'neg_entropy':
        return -_entropy(probs)
    raise ValueError(f'ATC score must be one of {ATC_SCORES}, got {score!r}')


def fit_atc_threshold(probs: torch.Tensor, labels: torch.Tensor, score: str = 'max_prob') -> float:
    """The threshold t at which the share of (labelled, in-distribution) images with score >= t equals their
    accuracy: t is the error-rate quantile of the scores.

    Args:
        probs: [N, C] predicted probabilities on source validation images.
        labels: [N] their labels.
        score: 'max_prob' (ATC-MC) or 'neg_entropy' (ATC-NE).
    """
    if len(labels) == 0:
        raise ValueError('ATC needs labelled validation images to fit its threshold')
    s = atc_score(probs.double(), score)
    error = float((probs.argmax(-1) != labels).double().mean())
    return float(torch.quantile(s, error)) if error > 0 else float(s.min())


def fit_atc_tie_share(probs: torch.Tensor, labels: torch.Tensor, threshold: float, score: str = 'max_prob') -> float:
    """The share of the images scoring exactly `threshold` that ATC counts as right: the one that makes the
    labelled images' count equal their accuracy.

    Scores tie where probabilities saturate (a confident model's maximum probability rounds to 1.0) or a model rounds
    its outputs: with the threshold among them, counting every tied image overstates the accuracy (90%-accurate source
    images, 95% of them at 1.0, were estimated at 95%). 1.0 where none ties.
    """
    s = atc_score(probs.double(), score)
    tied = int((s == threshold).sum())
    if tied == 0:
        return 1.0
    right = int((probs.argmax(-1) == labels).sum())
    return min(max((right - int((s > threshold).sum())) / tied, 0.0), 1.0)


def atc_estimate(probs: torch.Tensor, threshold: float, score: str = 'max_prob', tie_share: float = 1.0) -> float:
    """Estimated accuracy (%) of unlabelled images: the share whose score clears the fitted threshold, those exactly
    at it counted `tie_share` each (`fit_atc_tie_share`)."""
    s = atc_score(probs.double(), score)
    return float(((s > threshold).double().sum() + tie_share * (s == threshold).double().sum()) / len(s) * 100)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling: the T in [0.05, 20] minimising the NLL of softmax(log(probs) / T) on labelled images.

    Args:
        probs: [N, C] predicted probabilities on source validation images (log-probabilities are logits up to a
            per-image constant, which softmax ignores).
        labels: [N] their labels.
    """
    if len(labels) == 0:
        raise ValueError('temperature scaling needs labelled validation images')
    log_probs = probs.detach().double().clamp_min(1e-30).log()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn='strong_wolfe')

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(log_probs / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # a perfectly separated validation set drives T to 0: keep it in a range where softmax stays finite
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def cot_estimate(
        probs: torch.Tensor,
        label_share: torch.Tensor,
        temperature: float = 1.0,
        max_images: int = COT_MAX_IMAGES,
) -> float:
    """Estimated accuracy (%) by confidence optimal transport: 100 x (1 - the mean cost of transporting the
    temperature-scaled predictions onto one-hot labels drawn in the proportions `label_share`), the cost of
    prediction p to label y being 1 - p_y.

    Args:
        probs: [N, C] predicted probabilities on unlabelled images.
        label_share: [C] expected share of each class (a training run's: the histogram of every source label).
        temperature: Scaling of log(probs) fitted on source validation (`fit_temperature`).
        max_images: Above this many images, a fixed random sample of this size is transported.
    """
    from scipy.optimize import linear_sum_assignment
    n, num_classes = probs.shape
    if n == 0:
        raise ValueError('COT needs at least one image')
    if label_share.shape != (num_classes,) or bool((label_share < 0).any()) or float(label_share.sum()) <= 0:
        raise ValueError(f'label_share must hold {num_classes} non-negative class shares, got {tuple(label_share.shape)}')
    if n > max_images:
        probs = probs[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images]]
        n = max_images
    probs = (probs.double().clamp_min(1e-30).log() / temperature).softmax(-1)
    share = label_share.double() / label_share.sum()
    counts = (share * n).floor().long()
    # largest remainders get the images left over, so the labels number exactly n
    counts[torch.argsort(counts - share * n)[:n - int(counts.sum())]] += 1
    cost = 1 - probs[:, torch.repeat_interleave(torch.arange(num_classes), counts)].numpy()
    rows, cols = linear_sum_assignment(cost)
    return float((1 - cost[rows, cols].mean()) * 100)


def label_free_scores(
        probs: torch.Tensor,
        reference_predictions: Optional[torch.Tensor] = None,
        pseudo_label_threshold: float = 0.95,
) -> Dict[str, float]:
    """Scores of one model on unlabelled images, none of which uses a label.

    Args:
        probs: [N, C] softmax outputs on the held-out target slice.
        reference_predictions: [N] predicted classes of the source-only model on the same images.
        pseudo_label_threshold: FixMatch's tau, for the keep share and balance of pseudo-labels.

    Returns:
        mean_confidence, mean_entropy, entropy_of_mean, information_maximization (their difference, IM),
        bnm (nuclear norm of the probability matrix over N, Cui et al. CVPR 2020), effective_classes
        (exp of the entropy of the predicted-class histogram), dead_classes (< 1% of the images),
        pseudo_keep_share and pseudo_effective_classes (the images and classes FixMatch would train on),
        and agreement (% equal to the source-only model's predictions) when a reference is given.
    """
    probs = probs.double()
    n, num_classes = probs.shape
    preds = probs.argmax(-1)
    mean_entropy = float(_entropy(probs).mean())
    entropy_of_mean = float(_entropy(probs.mean(0)))
    confidence = probs.max(-1).values
    kept = confidence >= pseudo_label_threshold
    scores = dict(
        mean_confidence=float(confidence.mean()),
        mean_entropy=mean_entropy,
        entropy_of_mean=entropy_of_mean,
        information_maximization=entropy_of_mean - mean_entropy,
        bnm=float(torch.linalg.matrix_norm(probs, ord='nuc') / n),
        effective_classes=effective_classes(preds, num_classes),
        dead_classes=dead_classes(preds, num_classes),
        pseudo_keep_share=float(kept.double().mean()),
        pseudo_effective_classes=effective_classes(preds[kept], num_classes),
    )
    if reference_predictions is not None:
        if reference_predictions.shape != preds.shape:
            raise ValueError(f'reference predictions {tuple(reference_predictions.shape)} do not match the '
                             f'{n} images scored')
        scores['agreement'] = float((preds == reference_predictions).double().mean() * 100)
    return scores


# below this many images per class, a healthy model's predicted-class counts stray far from the class shares by
# chance (simulated, 10 classes, 80% accurate and calibrated: 10 images gave a false collapse warning in 98% of
# folders and a COT estimate of 50%, 100 images none and 74%; a 100% accurate model against a 60% one was flagged
# by the guard in 32% of 10-image slices, 15% of 30-image ones, none of 100-image ones)
MIN_IMAGES_PER_CLASS = 10


@dataclass
class CollapseGuard:
    """Flags a candidate whose predictions collapsed relative to the source-only model.

    A candidate is flagged when any of these holds (the source-only model is never flagged: it is the fallback):
    - its effective number of predicted classes fell below `min_effective_ratio` x the source-only model's;
    - it has more than `max_new_dead` more dead classes (predicted for < 1% of the target slice) than the
      source-only model (a count: a class that died while another revived cancels out);
    - its agreement with the source-only model is below `min_agreement` % while its mean confidence rose
      (confidently relabelling the target: the signature of self-training on wrong pseudo-labels).

    The defaults are the setting the label-free selection study fitted on all five targets of the offline
    benchmark (docs/RESULTS.md, "Label-free checkpoint selection"; graded there leave one target out).
    """
    min_effective_ratio: float = 0.95
    max_new_dead: int = 1
    min_agreement: float = 30.0

    def check(self, row: Dict[str, float], reference: Dict[str, float]) -> List[str]:
        """Reasons `row` (a candidate's label-free scores) counts as collapsed; empty when it passes."""
        reasons = []
        ratio = row['effective_classes'] / max(reference['effective_classes'], 1e-9)
        if ratio < self.min_effective_ratio:
            reasons.append(f'effective classes {row["effective_classes"]:.2f} < {self.min_effective_ratio:g} x '
                           f'the source-only model\'s {reference["effective_classes"]:.2f}')
        new_dead = row['dead_classes'] - reference['dead_classes']
        if new_dead > self.max_new_dead:
            reasons.append(f'{new_dead} more dead classes than the source-only model ({row["dead_classes"]} vs '
                           f'{reference["dead_classes"]})')
        agreement = row.get('agreement')
        if agreement is not None and agreement < self.min_agreement \
                and row['mean_confidence'] > reference['mean_confidence']:
            reasons.append(f'agreement with the source-only model {agreement:.1f}% < {self.min_agreement:g}% while '
                           f'confidence rose ({reference["mean_confidence"]:.2f} -> {row["mean_confidence"]:.2f})')
        return reasons


# rule name: (the guard applies, history key maximised among candidates; ties go to the later epoch)
RULES: Dict[str, Tuple[bool, str]] = {
    'last': (False, 'epoch'),
    'guarded_last': (True, 'epoch'),
    'guarded_estimate': (True, 'estimated_accuracy'),
}


@dataclass
class Selection:
    """The chosen candidate and why. `guard_fired`: the guard flagged the last epoch, so the rule fell back to an
    earlier one (or to the source-only model); `flagged` lists every flagged epoch with its reasons."""
    rule: str
    epoch: int
    reason: str
    guard_fired: bool = False
    flagged: Dict[int, List[str]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d['flagged'] = {str(k): v for k, v in self.flagged.items()}
        return d


def select_checkpoint(
        candidates: Sequence[Dict[str, float]],
        rule: str = 'guarded_last',
        guard: Optional[CollapseGuard] = None,
) -> Selection:
    """Pick a candidate by `rule`; the first candidate is the source-only model and always eligible.

    Args:
        candidates: Per-epoch rows with 'epoch' and the label-free scores; candidates[0] is the source-only model
            (the start of adaptation) that the guard compares with.
        rule: A key of RULES.
        guard: The collapse guard (defaults to `CollapseGuard()`), used by the guarded rules.

    Returns:
        The chosen epoch, a sentence saying why, whether the guard fired (flagged the last epoch), and the reasons
        per flagged epoch.
    """
    if rule not in RULES:
        raise ValueError(f'--select must be one of {sorted(RULES)}, got {rule!r}')
    if not candidates:
        raise ValueError('no candidate to select from')
    guarded, key = RULES[rule]
    guard = guard or CollapseGuard()
    reference = candidates[0]
    flagged: Dict[int, List[str]] = {}
    if guarded:
        for row in candidates[1:]:
            reasons = guard.check(row, reference)
            if reasons:
                flagged[int(row['epoch'])] = reasons
    eligible = [r for r in candidates if int(r['epoch']) not in flagged]

    def value(row: Dict[str, float]) -> Tuple[float, int]:
        v = row.get(key)
        return (-math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v), int(row['epoch']))

    best = max(eligible, key=value)
    epoch = int(best['epoch'])
    if epoch == int(reference['epoch']) and len(candidates) > 1:
        reason = (f'{rule}: every adapted epoch was flagged by the collapse guard; falling back to the source-only '
                  f'model (epoch {epoch})') if len(eligible) == 1 else \
            f'{rule}: the source-only model (epoch {epoch}) has the highest {key}'
    elif key == 'epoch':
        reason = f'{rule}: the latest epoch{" the collapse guard did not flag" if guarded else ""} ({epoch})'
    else:
        reason = f'{rule}: the highest {key} ({value(best)[0]:.2f}) among unflagged candidates, epoch {epoch}'
    last = int(candidates[-1]['epoch'])
    return Selection(rule, epoch, reason, last in flagged, flagged)
