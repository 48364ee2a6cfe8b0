"""End-of-run pictures: confusion matrix, t-SNE of source and target features (paper Fig. 8), curves.

matplotlib and scikit-learn come with the `[data]` extra, not with the core install: `write_report` skips the
pictures it cannot draw, with one log line, and the run still finishes.
"""
import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['missing_report_packages', 'plot_confusion', 'plot_tsne', 'plot_curves', 'tsne_perplexity', 'write_report']

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


def tsne_perplexity(points: int) -> int:
    """The perplexity of the t-SNE of `points` features: a tenth of them, within [5, 30]. scikit-learn needs it
    below the number of points."""
    return min(30, max(5, points // 10))


def write_report(
        out_dir: Path,
        confusion: Optional[Sequence[Sequence[int]]],
        classes: Sequence[str],
        title: str,
        history: List[Dict[str, float]],
        tsne_features: Optional[Callable[[], Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]] = None,
        target: str = '',
        seed: int = 0,
        selected_epoch: Optional[int] = None,
) -> List[Path]:
    """Draw confusion_matrix.png (when the target has labels), curves.png and (given `tsne_features`) tsne.png;
    returns the files written.

    `tsne_features` returns per-domain features and labels; it is called only when the plotting packages are there.
    """
    out_dir = Path(out_dir)
    missing = missing_report_packages(tsne=tsne_features is not None)
    if 'matplotlib' in missing:
        _logger.info(f"report pictures skipped: {' and '.join(missing)} not installed "
                     "(pip install 'dida-timm[data]' to draw them)")
        return []
    written = []

    def draw(name: str, plot: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        # a picture is a view of results already written: one that fails is logged, the run still ends with its table
        try:
            plot(*args, out_dir / name, **kwargs)
            written.append(out_dir / name)
        except (MemoryError, ValueError, RuntimeError, OSError) as e:
            _logger.warning(f'{name} not drawn ({type(e).__name__}: {e}); results.json holds its numbers')

    draw('curves.png', plot_curves, history, selected_epoch=selected_epoch)
    if confusion is not None:
        draw('confusion_matrix.png', plot_confusion, confusion, classes, title)
    if tsne_features is not None:
        if missing:
            _logger.info(f"t-SNE picture skipped: {' and '.join(missing)} not installed "
                         "(pip install 'dida-timm[data]' to draw it)")
        else:
            features, labels = tsne_features()
            points = sum(map(len, features.values()))
            # domains with fewer images than --tsne-per-domain asks for, which the options could not know
            if tsne_perplexity(points) >= points:
                _logger.warning(f't-SNE picture skipped: {points} images, too few for its perplexity '
                                f'{tsne_perplexity(points)}')
            else:
                draw('tsne.png', plot_tsne, features, labels, classes, target, seed=seed)
    return written


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


MAX_CONFUSION_INCHES = 25.0


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix (true class per row), with the counts written in each cell."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    # capped: DomainNet's 345 classes asked for 157 inches (18,700 px a side, 2.6 GB to draw); past 100 classes
    # their names cannot be read at a size that draws, so the axes are left unnamed
    size = min(max(5.0, 0.45 * len(classes) + 2), MAX_CONFUSION_INCHES)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
    if len(classes) <= 100:
        fontsize = 10 if len(classes) <= 40 else 6
        ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0, fontsize=fontsize)
        ax.set_yticks(range(len(classes)), classes, fontsize=fontsize)
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
    emb = TSNE(n_components=2, init='pca', perplexity=tsne_perplexity(len(x)), random_state=seed).fit_transform(x)
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


def plot_curves(history: List[Dict[str, float]], path: Path, selected_epoch: Optional[int] = None) -> None:
    """Per-epoch curves: accuracy (true where target labels exist, estimated, source validation), losses,
    pseudo-labels, and the label-free collapse indicators; the selected epoch is marked."""
    plt = _pyplot()
    epochs = [h['epoch'] for h in history]

    def plot(ax, key, label):
        if any(h.get(key) is not None for h in history):
            ax.plot(epochs, [np.nan if h.get(key) is None else h[key] for h in history], marker='o', markersize=3,
                    label=label)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    plot(axes[0], 'target_accuracy', 'target test accuracy (true)')
    plot(axes[0], 'estimated_accuracy', 'target accuracy estimated without labels (ATC)')
    plot(axes[0], 'cot_estimated_accuracy', 'target accuracy estimated without labels (COT)')
    plot(axes[0], 'source_val_accuracy', 'source validation accuracy')
    axes[0].set_title('accuracy (%)')
    for key in ('source_loss', 'unlabelled_loss'):
        plot(axes[1], key, key)
    axes[1].set_title('training losses')
    plot(axes[2], 'keep_rate', 'kept share of target pseudo-labels')
    plot(axes[2], 'pseudo_accuracy', 'accuracy of kept pseudo-labels (labels needed)')
    plot(axes[2], 'mean_confidence', 'mean confidence, held-out target')
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title('pseudo-labels and confidence')
    plot(axes[3], 'effective_classes', 'effective predicted classes')
    plot(axes[3], 'dead_classes', 'dead classes (< 1% of images)')
    twin = axes[3].twinx()
    if any(h.get('agreement') is not None for h in history):
        twin.plot(epochs, [np.nan if h.get('agreement') is None else h['agreement'] for h in history], color='grey',
                  linestyle=':', marker='.', label='agreement with source-only (%)')
        twin.set_ylim(0, 102)
        twin.legend(fontsize=7, loc='lower right')
    axes[3].set_title('collapse indicators (held-out target, no labels)')
    adapt_from = [h['epoch'] for h in history if h.get('phase') in ('source_only', 'start', 'static_start')]
    for ax in axes:
        if adapt_from:
            ax.axvline(adapt_from[-1] + 0.5, color='grey', linestyle='--', linewidth=1)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color='tab:red', linewidth=1.5, alpha=0.6)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if selected_epoch is not None:
        axes[0].text(selected_epoch, axes[0].get_ylim()[0], ' selected', color='tab:red', fontsize=8, va='bottom')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
