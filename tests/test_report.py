"""End-of-run report pictures, with and without the optional plotting packages."""
import logging
import sys

import numpy as np

from dida_timm.training.report import write_report

HISTORY = [dict(epoch=1, phase='source_only', target_accuracy=50.0, source_loss=1.0),
           dict(epoch=2, phase='fixmatch', target_accuracy=60.0, source_loss=0.5, keep_rate=0.4)]


def _features():
    rng = np.random.default_rng(0)
    return ({d: rng.normal(size=(20, 4)) for d in ('a', 'b')}, {d: rng.integers(0, 2, 20) for d in ('a', 'b')})


def test_core_install_skips_the_pictures_with_one_log_line(tmp_path, monkeypatch, caplog):
    # the core install has neither matplotlib nor scikit-learn (they come with the [data] extra)
    for name in [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'sklearn', None)
    called = []
    with caplog.at_level(logging.INFO):
        written = write_report(tmp_path, [[3, 1], [0, 4]], ['x', 'y'], 'title', HISTORY,
                               lambda: called.append(1) or _features(), 'b')
    assert written == [] and not list(tmp_path.iterdir()) and not called
    skipped = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(skipped) == 1 and 'matplotlib' in skipped[0] and "dida-timm[data]" in skipped[0]


def test_report_draws_every_picture_when_the_packages_are_there(tmp_path):
    written = write_report(tmp_path, [[3, 1], [0, 4]], ['x', 'y'], 'title', HISTORY, _features, 'b')
    assert sorted(p.name for p in written) == ['confusion_matrix.png', 'curves.png', 'tsne.png']
    assert all(p.stat().st_size > 1000 for p in written)


def test_a_t_sne_of_too_few_images_is_skipped_with_a_log_line(tmp_path, caplog):
    """Domains smaller than --tsne-per-domain leave fewer points than the options checked for."""
    rng = np.random.default_rng(0)
    few = ({d: rng.normal(size=(2, 4)) for d in 'ab'}, {d: rng.integers(0, 2, 2) for d in 'ab'})
    with caplog.at_level(logging.INFO):
        written = write_report(tmp_path, None, ['x', 'y'], '', HISTORY, lambda: few, 'b')
    assert [p.name for p in written] == ['curves.png']
    assert 't-SNE picture skipped: 4 images, too few for its perplexity 5' in caplog.text


def test_a_confusion_matrix_of_hundreds_of_classes_is_drawn_at_a_bounded_size(tmp_path):
    # DomainNet's 345 classes asked for an 18,700 px picture: 2.6 GB to draw, killed or crashed at the run's end
    from PIL import Image

    from dida_timm.training.report import plot_confusion
    counts = np.eye(345, dtype=int) * 5 + 1
    plot_confusion(counts.tolist(), [f'c{i}' for i in range(345)], 'title', tmp_path / 'confusion.png')
    assert max(Image.open(tmp_path / 'confusion.png').size) <= 3000


def test_a_picture_that_fails_is_logged_and_the_others_are_drawn(tmp_path, monkeypatch, caplog):
    import dida_timm.training.report as report

    def fail(*args, **kwargs):
        raise MemoryError('Unable to allocate 2.60 GiB')
    monkeypatch.setattr(report, 'plot_confusion', fail)
    with caplog.at_level(logging.WARNING):
        written = write_report(tmp_path, [[3, 1], [0, 4]], ['x', 'y'], 'title', HISTORY, _features, 'b')
    assert [p.name for p in written] == ['curves.png', 'tsne.png']
    assert any('confusion_matrix.png not drawn (MemoryError: Unable to allocate' in r.getMessage()
               for r in caplog.records)
