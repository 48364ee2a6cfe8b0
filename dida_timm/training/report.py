"""End-of-run pictures: confusion matrix, t-SNE of source and target features (paper Fig. 8), curves.

matplotlib and scikit-learn come with the `[data]` extra, not with the core install: `write_report` skips the
pictures it cannot draw, with one log line, and the run still finishes.
"""
import importlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['missing_report_packages', 'plot_confusion', 'plot_tsne', 'plot_curves', 'write_report']

_logger = logging.getLogger(__name__)


def missing_report_packages(tsne: bool = True) -> List[str]:
    """The packages the report pictures need (scikit-learn only for the t-SNE) that cannot be imported."""
    needed = [('matplotlib', 'matplotlib')] + ([('sklearn', 'scikit-learn')] if tsne else [])
    missing = []
    for module, package in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def write_report(
        out_dir: Path,
        confusion: Sequence[Sequence[int]],
        classes: Sequence[str],
        title: str,
        history: List[Dict[str, float]],
        tsne_features: Optional[Callable[[], Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]] = None,
        target: str = '',
        seed: int = 0,
) -> List[Path]:
    """Draw confusion_matrix.png, curves.png and (given `tsne_features`) tsne.png; returns the files written.

    `tsne_features` returns per-domain features and labels; it is called only when the t-SNE can be drawn.
    """
    out_dir = Path(out_dir)
    missing = missing_report_packages(tsne=tsne_features is not None)
    if 'matplotlib' in missing:
        _logger.info(f"report pictures skipped: {' and '.join(missing)} not installed "
                     "(pip install 'dida-timm[data]' to draw them)")
        return []
    written = [out_dir / 'confusion_matrix.png', out_dir / 'curves.png']
    plot_confusion(confusion, classes, title, written[0])
    plot_curves(history, written[1])
    if tsne_features is not None:
        if missing:
            _logger.info(f"t-SNE picture skipped: {' and '.join(missing)} not installed "
                         "(pip install 'dida-timm[data]' to draw it)")
        else:
            features, labels = tsne_features()
            written.append(out_dir / 'tsne.png')
            plot_tsne(features, labels, classes, target, written[-1], seed=seed)
    return written


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix (true class per row), with the counts written in each cell."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if rates[i, j] > 0.5 else 'black')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tsne(
        features: Dict[str, np.ndarray],
        labels: Dict[str, np.ndarray],
        classes: Sequence[str],
        target: str,
        path: Path,
        seed: int = 0,
) -> None:
    """2-D t-SNE of every domain's features: left coloured by class, right by domain (target in black)."""
    from sklearn.manifold import TSNE
    plt = _pyplot()
    domains = list(features)
    x = np.concatenate([features[d] for d in domains])
    y = np.concatenate([labels[d] for d in domains])
    dom = np.concatenate([[i] * len(features[d]) for i, d in enumerate(domains)])
    emb = TSNE(n_components=2, init='pca', perplexity=min(30, max(5, len(x) // 10)), random_state=seed).fit_transform(x)
    fig, (ax_c, ax_d) = plt.subplots(1, 2, figsize=(13, 6))
    cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20')
    for c in range(len(classes)):
        sel = y == c
        ax_c.scatter(emb[sel, 0], emb[sel, 1], s=4, color=cmap(c % cmap.N), label=classes[c])
    if len(classes) <= 20:
        ax_c.legend(markerscale=3, fontsize=7, loc='best')
    ax_c.set_title('features coloured by class')
    palette = plt.get_cmap('Set2')
    for i, d in enumerate(domains):
        sel = dom == i
        colour = 'black' if d == target else palette(i % palette.N)
        ax_d.scatter(emb[sel, 0], emb[sel, 1], s=4, color=colour, label=f'{d} (target)' if d == target else d,
                     alpha=0.9 if d == target else 0.5)
    ax_d.legend(markerscale=3, fontsize=8, loc='best')
    ax_d.set_title('features coloured by domain')
    for ax in (ax_c, ax_d):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: List[Dict[str, float]], path: Path) -> None:
    """Target accuracy, losses and pseudo-label keep rate / accuracy per epoch."""
    plt = _pyplot()
    epochs = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h['target_accuracy'] for h in history], marker='o')
    axes[0].set_title('target test accuracy (%)')
    for key in ('source_loss', 'unlabelled_loss'):
        if any(key in h for h in history):
            axes[1].plot(epochs, [h.get(key, np.nan) for h in history], marker='o', label=key)
    axes[1].set_title('training losses')
    axes[1].legend()
    for key, label in (('keep_rate', 'kept share of target pseudo-labels'),
                       ('pseudo_accuracy', 'accuracy of kept pseudo-labels')):
        if any(key in h for h in history):
            axes[2].plot(epochs, [h.get(key, np.nan) for h in history], marker='o', label=label)
    adapt_from = [h['epoch'] for h in history if h.get('phase') == 'source_only']
    if adapt_from:
        for ax in axes:
            ax.axvline(adapt_from[-1] + 0.5, color='grey', linestyle='--', linewidth=1)
        axes[0].text(adapt_from[-1] + 0.6, axes[0].get_ylim()[0], ' adaptation starts', color='grey', fontsize=8,
                     va='bottom')
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title('pseudo-labels (diagnostic only)')
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
