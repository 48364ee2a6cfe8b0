"""The accuracy benches launch what they claim: every run of their grids is a valid train.py command line."""
import sys
from pathlib import Path

import pytest
import timm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
sys.path.insert(0, str(REPO / 'train'))

import train  # noqa: E402
from bench_dida_ablations import VARIANTS  # noqa: E402
from uda_runs import METHODS, SIZES, Run, offline_run, run_all, run_name  # noqa: E402

from dida_timm.data.offline_digits import DOMAINS  # noqa: E402


@pytest.mark.parametrize('size', sorted(SIZES))
@pytest.mark.parametrize('method', list(METHODS))
def test_study_run_parses_to_the_method_with_equal_total_epochs(method, size):
    run = offline_run('x', method, 'mnist', DOMAINS[1:], 0, size)
    args = train.parse_args(list(run.args))
    model, train_method, kwargs = METHODS[method]
    assert (args.model, args.method, args.model_kwargs) == (model, train_method, kwargs)
    assert (args.target, args.source) == ('mnist', list(DOMAINS[1:]))
    assert args.offline_train_size == SIZES[size]['train_size']
    assert args.source_only_epochs + args.epochs == SIZES[size]['source_only_epochs'] + SIZES[size]['epochs']
    # the rest of the recipe is the README main job's
    assert (args.lr, args.threshold, args.rand_augment) == (0.05, 0.95, 'rand-m10-n2-mstd0.5')


def test_ablation_variants_build_distinct_models_and_names():
    names = set()
    for _, method, options, train_args in VARIANTS.values():
        run = offline_run('x', method, 'mnistm_style', DOMAINS[:-1], 0, 'cpu', options, train_args)
        args = train.parse_args(list(run.args))
        assert all(args.model_kwargs[k] == v for k, v in options.items())
        timm.create_model(args.model, **args.model_kwargs)  # the options are valid module options
        names.add(run_name('mnistm_style', method, options, 0, train_args))
    assert len(names) == len(VARIANTS)
    # the ablations reuse the study's runs by name
    assert run_name('mnistm_style', 'DIDA-Net', {}, 2) == 'mnistm_style-DIDA-Net-s2'


@pytest.mark.parametrize('variant, field, value', [
    ('source_target_stream', 'unlabelled_stream', 'source+target'),
    ('no_branch_source_target_stream', 'unlabelled_stream', 'source+target'),
    ('lr_10x', 'new_lr_scale', 10.0),
    ('no_branch_lr_10x', 'new_lr_scale', 10.0),
    ('weak_augment', 'rand_augment', 'rand-m5-n2-mstd0.5'),
    ('no_branch_weak_augment', 'cutout', 8),
])
def test_recipe_variants_change_the_recipe_of_their_method(variant, field, value):
    _, method, options, train_args = VARIANTS[variant]
    args = train.parse_args(list(offline_run('x', method, 'mnistm_style', DOMAINS[:-1], 0, 'cpu', options,
                                             train_args).args))
    assert getattr(args, field) == value
    assert args.model == METHODS[method][0]


def test_run_all_skips_finished_runs_and_names_the_log_of_a_failed_one(tmp_path):
    (tmp_path / 'done').mkdir()
    (tmp_path / 'done' / 'results.json').write_text('{"target_accuracy": 50.0}')
    assert run_all([Run('done', ('--no-such-flag',))], tmp_path) == {'done': {'target_accuracy': 50.0}}
    with pytest.raises(SystemExit, match=r'run bad failed .*bad\.log'):
        run_all([Run('bad', ('--no-such-flag',))], tmp_path)
    assert 'unrecognized arguments: --no-such-flag' in (tmp_path / 'bad.log').read_text()


def test_branch_kwargs_move_both_branches_and_keep_the_baselines_runs(monkeypatch, tmp_path):
    import bench_uda_accuracy
    launched = {}

    def fake_run_all(runs, out, jobs):
        launched.update({r.name: train.parse_args(list(r.args)) for r in runs})
        history = [{'phase': 'fixmatch', 'keep_rate': 0.5, 'pseudo_accuracy': 0.9}]
        return {r.name: dict(target_accuracy=50.0, source_only_start_target_accuracy=40.0, history=history,
                             wall_seconds=1.0) for r in runs}

    monkeypatch.setattr(bench_uda_accuracy, 'run_all', fake_run_all)
    monkeypatch.setattr(sys, 'argv', ['bench_uda_accuracy.py', '--seeds', '0', '--targets', 'mnist',
                                      '--branch-kwargs', '{dida_blocks: [2]}', '--markdown', str(tmp_path / 't.md')])
    bench_uda_accuracy.main()
    assert launched['mnist-DIDA-Net-blocks2-s0'].model_kwargs == {'dida_blocks': [2]}
    assert launched['mnist-FixMatch_staticbranch-blocks2-s0'].model_kwargs == {'dida_dynamic': False,
                                                                              'dida_blocks': [2]}
    # the runs without a branch are the study's own
    assert launched['mnist-FixMatch-s0'].model_kwargs == {} and 'mnist-source-only-s0' in launched
    assert '{"dida_blocks": [2]}' in (tmp_path / 't.md').read_text()
