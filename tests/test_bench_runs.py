"""The accuracy benches launch what they claim: every run of their grids is a valid train.py command line."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))

from dida_timm.training import options as train  # noqa: E402  (train.py's parser)
from bench_dida_ablations import VARIANTS  # noqa: E402
from uda_runs import (  # noqa: E402
    METHODS, SIZES, Run, finished_results, offline_study, published_study, pseudo_label_cells, restore_records,
    run_all, run_name, static_twin, study_run, write_records)

from dida_timm.data.offline_digits import DOMAINS  # noqa: E402


@pytest.mark.parametrize('size', sorted(SIZES))
@pytest.mark.parametrize('method', list(METHODS))
def test_study_run_parses_to_the_method_with_equal_total_epochs(method, size):
    run = study_run(offline_study(size), 'x', method, 'mnist', 0)
    args = train.parse_args(list(run.args))
    uses_branch, train_method, kwargs = METHODS[method]
    model = 'dida_digitnet_compact' if uses_branch else 'digitnet_compact'
    assert (args.model, args.method, args.model_kwargs) == (model, train_method, kwargs)
    assert (args.target, args.source) == ('mnist', list(DOMAINS[1:]))
    assert args.offline_train_size == SIZES[size]['train_size']
    assert args.source_only_epochs + args.epochs == SIZES[size]['source_only_epochs'] + SIZES[size]['epochs']
    # the rest of the recipe is the README main job's
    assert (args.lr, args.threshold, args.rand_augment) == (0.05, 0.95, 'rand-m10-n2-mstd0.5')


def test_a_recipe_given_to_every_run_leaves_the_source_only_run_without_its_fixmatch_options():
    # train.py refuses them for a source-only run, which reads none of them: the study's baseline runs as before
    recipe = ('--forward', 'separate', '--no-pseudo-label-dropout', '--cutout=8', '--lr', '0.1')  # abbreviated too
    args = train.parse_args(list(study_run(offline_study('cpu'), 'x', 'source-only', 'mnist', 0, None, recipe).args))
    assert (args.method, args.lr, args.forward_mode, args.pseudo_label_dropout) == ('source_only', 0.1, 'joint', True)
    args = train.parse_args(list(study_run(offline_study('cpu'), 'x', 'FixMatch', 'mnist', 0, None, recipe).args))
    assert (args.forward_mode, args.pseudo_label_dropout, args.cutout) == ('separate', False, 8)


def test_ablation_variants_build_distinct_models_and_names():
    names = set()
    for _, method, options, train_args in VARIANTS.values():
        run = study_run(offline_study('cpu'), 'x', method, 'mnistm_style', 0, options, train_args)
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
    study = offline_study('cpu')
    args = train.parse_args(list(study_run(study, 'x', method, 'mnistm_style', 0, options, train_args).args))
    assert getattr(args, field) == value
    assert args.model == study.method_model(method)


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


CONFIGS = sorted((REPO / 'train' / 'configs').glob('*.yaml'))


@pytest.mark.parametrize('config', CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_published_setting_has_a_registered_static_twin(config, tmp_path):
    study = published_study(config, tmp_path)
    assert len(study.domains) >= 2
    twin = static_twin(study.model)
    assert timm.is_model(twin)
    if '.' in twin:  # the twin starts from the same pretrained weights
        assert twin in timm.list_pretrained(twin)
    for method in METHODS:
        args = train.parse_args(list(study_run(study, 'x', method, study.domains[0], 0).args))
        assert args.model == study.method_model(method) and args.data_dir == str(tmp_path)
        assert args.source == list(study.domains[1:]) and args.target == study.domains[0]


def test_published_study_keeps_the_configs_recipe_and_gives_fixmatch_the_static_twin(tmp_path):
    study = published_study(REPO / 'train' / 'configs' / 'pacs.yaml', tmp_path)
    assert study.domains == ('cartoon', 'photo', 'sketch', 'art_painting')
    fixmatch = train.parse_args(list(study_run(study, 'x', 'FixMatch', 'photo', 1).args))
    dida = train.parse_args(list(study_run(study, 'x', 'DIDA-Net', 'photo', 1).args))
    static = train.parse_args(list(study_run(study, 'x', 'FixMatch + static branch', 'photo', 1).args))
    assert (fixmatch.model, dida.model, static.model) == ('resnet18.tv_in1k', 'dida_resnet18.tv_in1k',
                                                          'dida_resnet18.tv_in1k')
    assert static.model_kwargs == {'dida_dynamic': False} and dida.model_kwargs == {}
    for args in (fixmatch, dida, static):
        assert (args.dataset, args.pretrained, args.lr, args.epochs, args.opt) == ('pacs', True, 5e-5, 100, 'adam')
        assert args.source == ['cartoon', 'sketch', 'art_painting'] and args.target == 'photo'


def test_published_study_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match='--data-dir .*missing'):
        published_study(REPO / 'train' / 'configs' / 'pacs.yaml', tmp_path / 'missing')
    (tmp_path / 'bad.yaml').write_text('dataset: pacs\nmodel: dida_resnet18\n')
    with pytest.raises(ValueError, match=r"bad\.yaml: a study needs the keys \['source', 'target', 'epochs'\]"):
        published_study(tmp_path / 'bad.yaml', tmp_path)
    study = published_study(REPO / 'train' / 'configs' / 'pacs.yaml', tmp_path)
    with pytest.raises(ValueError, match="target 'photos' is not one of"):
        study_run(study, 'x', 'DIDA-Net', 'photos', 0)
    with pytest.raises(ValueError, match='expected a DIDA model'):
        static_twin('resnet18.tv_in1k')


def _tiny_pacs(root: Path) -> Path:
    """Every PACS domain with two classes in the official split-file layout, 4 noise images per class and split."""
    rng = np.random.default_rng(0)
    for domain in ('art_painting', 'cartoon', 'photo', 'sketch'):
        for split in ('train', 'crossval', 'test'):
            lines = []
            for label, cls in enumerate(('dog', 'horse'), 1):
                for i in range(4):
                    rel = f'{domain}/{cls}/{split}_{i}.png'
                    (root / 'images' / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / 'images' / rel)
                    lines.append(f'{rel} {label}')
            (root / 'splits').mkdir(exist_ok=True)
            (root / 'splits' / f'{domain}_{split}_kfold.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_config_study_runs_a_published_setting_end_to_end(monkeypatch, tmp_path):
    import bench_uda_accuracy
    data = _tiny_pacs(tmp_path / 'pacs')
    monkeypatch.setattr(sys, 'argv', [
        'bench_uda_accuracy.py', '--config', str(REPO / 'train' / 'configs' / 'pacs.yaml'), '--data-dir', str(data),
        '--targets', 'photo', '--methods', 'FixMatch', '--seeds', '0', '--out', str(tmp_path / 'runs'),
        '--markdown', str(tmp_path / 't.md'),
        '--train-args', '--no-pretrained --epochs 1 --input-size 32 --batch-size 2 --workers 0'])
    bench_uda_accuracy.main()
    table = (tmp_path / 't.md').read_text()
    assert 'pacs (`pacs.yaml`, the published recipe), 0 source-only + 100 FixMatch epochs' in table
    assert '`dida_resnet18.tv_in1k` and its static twin' in table
    assert table.count('| photo |') == 3  # the accuracy row, then DIDA-Net's and FixMatch's pseudo-label rows
    for name, model in (('photo-FixMatch', 'resnet18'), ('photo-DIDA-Net', 'dida_resnet18')):
        (run,) = (tmp_path / 'runs').glob(f'{name}-no-pretrained_*-s0')
        results = json.loads((run / 'results.json').read_text())
        assert results['model'] == f'{model}.tv_in1k' and results['target'] == 'photo'
        assert results['sources'] == ['cartoon', 'sketch', 'art_painting']


def test_shared_start_runs_the_static_start_first_and_adapts_every_method_from_it(monkeypatch, tmp_path):
    import bench_uda_accuracy
    batches = []

    def fake_run_all(runs, out, jobs):
        batches.append({r.name: train.parse_args(list(r.args)) for r in runs})
        for r in runs:  # a finished run leaves its weights, which the next batch may start from
            (out / r.name).mkdir(parents=True, exist_ok=True)
            (out / r.name / 'model.safetensors').touch()
        history = [{'phase': 'fixmatch', 'keep_rate': 0.5, 'pseudo_accuracy': 0.9}]
        return {r.name: dict(target_accuracy=50.0 + len(batches), source_only_start_target_accuracy=None,
                             history=history, wall_seconds=1.0) for r in runs}

    monkeypatch.setattr(bench_uda_accuracy, 'run_all', fake_run_all)
    monkeypatch.setattr(sys, 'argv', ['bench_uda_accuracy.py', '--seeds', '0', '--targets', 'mnist', '--shared-start',
                                      '--out', str(tmp_path), '--markdown', str(tmp_path / 't.md')])
    bench_uda_accuracy.main()
    starts, adapting = batches
    (start_name, start), = starts.items()  # one (target, seed): one start, run before the others
    study = offline_study('cpu')
    assert (start.model, start.method, start.epochs) == ('digitnet_compact', 'source_only', study.source_only_epochs)
    for method in ('FixMatch', 'FixMatch + static branch', 'DIDA-Net'):
        args = adapting[run_name('mnist', method, {}, 0, shared_start=True)]
        assert args.init_checkpoint == str(tmp_path / start_name / 'model.safetensors')
        assert (args.source_only_epochs, args.epochs, args.model) == (0, study.epochs, study.method_model(method))
    # the source-only baseline is the study's own run; the start column shows the shared start's accuracy
    assert adapting['mnist-source-only-s0'].init_checkpoint == ''
    assert '| mnist | DIDA-Net | 51.0 | 52.0 |' in (tmp_path / 't.md').read_text()


def test_forward_mode_study_steps_parse_to_the_options_they_name():
    from bench_forward_mode import STEPS
    seen = set()
    for step, train_args in STEPS.items():
        run = study_run(offline_study('cpu'), 'x', 'DIDA-Net', 'mnist', 0, train_args=train_args)
        args = train.parse_args(list(run.args))
        setting = (args.forward_mode, args.pseudo_label_dropout, args.rand_augment)
        assert setting[0] == ('separate' if step.startswith('separate') else 'joint')
        assert setting[1] == ('no dropout' not in step)
        assert setting[2] == ('fixmatch' if 'FixMatch view' in step else 'rand-m10-n2-mstd0.5')
        seen.add(setting)
    assert len(seen) == len(STEPS)


def test_records_of_finished_runs_restore_what_the_study_tables_read(tmp_path):
    adapting = dict(target_accuracy=71.25, source_only_start_target_accuracy=50.5, wall_seconds=300.0, history=[
        dict(phase='source_only', epoch=3), dict(phase='fixmatch', keep_rate=0.4, pseudo_accuracy=0.9),
        dict(phase='fixmatch', keep_rate=0.55, pseudo_accuracy=0.875)])
    source_only = dict(target_accuracy=60.0, source_only_start_target_accuracy=None, wall_seconds=200.0,
                       history=[dict(phase='source_only', epoch=15)])
    records = tmp_path / 'records.csv'
    write_records(records, {'a': adapting, 's': source_only})
    out = tmp_path / 'elsewhere'
    (out / 'done').mkdir(parents=True)
    (out / 'done' / 'results.json').write_text(json.dumps(dict(target_accuracy=1.0)))
    assert sorted(restore_records(records, out, ['a', 's', 'done', 'missing'])) == ['a', 's']
    restored = finished_results(out, ['a', 's', 'done', 'missing'])
    assert set(restored) == {'a', 's', 'done'} and restored['done']['target_accuracy'] == 1.0
    assert pseudo_label_cells([restored['a']]) == pseudo_label_cells([adapting])
    assert restored['s']['target_accuracy'] == 60.0 and restored['s']['source_only_start_target_accuracy'] is None
    assert restored['a']['wall_seconds'] == 300.0


def test_holdout_replays_the_default_rule_and_grades_the_estimates_of_its_pick(tmp_path):
    from bench_label_free_holdout import adapting_runs, holdout_row
    rng = np.random.default_rng(0)

    def epoch(number, accuracy, effective):
        return dict(epoch=number, phase='fixmatch' if number > 1 else 'source_only', target_accuracy=accuracy,
                    effective_classes=effective, dead_classes=0 if effective > 5 else 8, agreement=90.0,
                    mean_confidence=0.9, estimated_accuracy=80.0)

    # epoch 1 is the source-only model; epoch 3 collapses, so the default rule ships epoch 2
    history = [epoch(1, 60.0, 9.5), epoch(2, 70.0, 9.4), epoch(3, 20.0, 1.5)]
    run_dir = tmp_path / 'mnist-DIDA-Net-s2'
    (run_dir / 'label_free').mkdir(parents=True)
    (run_dir / 'results.json').write_text(json.dumps(dict(method='fixmatch', source_only_epochs=1, history=history)))
    (tmp_path / 'mnist-source-only-s2').mkdir()
    (tmp_path / 'mnist-source-only-s2' / 'results.json').write_text(json.dumps(dict(method='source_only')))
    labels = rng.integers(0, 10, 300)
    probs = np.eye(10)[labels] * 0.9 + 0.01  # confident and always right
    for number in (1, 2, 3):
        np.savez(run_dir / 'label_free' / f'epoch-{number:04d}.npz', target_probs=probs[:200],
                 target_labels=labels[:200], source_probs=probs[200:], source_labels=labels[200:])
    runs = adapting_runs(tmp_path)
    assert list(runs) == ['mnist-DIDA-Net-s2']
    row = holdout_row('mnist-DIDA-Net-s2', runs['mnist-DIDA-Net-s2'], run_dir)
    assert (row['target'], row['method'], row['seed']) == ('mnist', 'DIDA-Net', 2)
    # a study's option suffix and the static-branch method's folder form name the study's method
    for name, method in (('svhn_style-FixMatch-keep-checkpoints_100-s2', 'FixMatch'),
                         ('svhn_style-FixMatch_staticbranch-s2', 'FixMatch + static branch')):
        assert holdout_row(name, runs['mnist-DIDA-Net-s2'], run_dir)['method'] == method
    assert (row['source_only'], row['last'], row['selected'], row['oracle']) == (60.0, 20.0, 70.0, 70.0)
    assert row['guard_fired'] and row['selected_epoch'] == 2
    assert row['target_slice_accuracy'] == 100.0 and row['estimated_ATC (max_prob)'] == 100.0


def test_a_last_epoch_that_kept_no_pseudo_label_round_trips_the_records_and_shows_no_share(tmp_path):
    kept_none = dict(target_accuracy=20.0, source_only_start_target_accuracy=None, wall_seconds=10.0,
                     history=[dict(phase='fixmatch', keep_rate=0.0, pseudo_accuracy=None)])
    records = tmp_path / 'records.csv'
    write_records(records, {'k': kept_none})
    restore_records(records, tmp_path / 'out', ['k'])
    restored = finished_results(tmp_path / 'out', ['k'])['k']
    assert restored['history'][-1]['pseudo_accuracy'] is None
    assert pseudo_label_cells([restored])['correct'] == pseudo_label_cells([kept_none])['correct'] == '-'


def test_full_size_study_has_its_own_run_folders(monkeypatch, tmp_path):
    # finished runs are reused by name: a cpu-size run stood in for a --full one
    import bench_uda_accuracy
    folders = []

    def fake_run_all(runs, out, jobs):
        folders.append(out)
        history = [{'phase': 'fixmatch', 'keep_rate': 0.5, 'pseudo_accuracy': 0.9}]
        return {r.name: dict(target_accuracy=50.0, source_only_start_target_accuracy=40.0, history=history,
                             wall_seconds=1.0) for r in runs}

    monkeypatch.setattr(bench_uda_accuracy, 'run_all', fake_run_all)
    for size in ([], ['--full']):
        monkeypatch.setattr(sys, 'argv', ['bench_uda_accuracy.py', '--seeds', '0', '--targets', 'mnist', *size,
                                          '--markdown', str(tmp_path / 't.md')])
        bench_uda_accuracy.main()
    assert folders == [Path('output/uda_accuracy'), Path('output/uda_accuracy_full')]


def test_label_free_study_refuses_one_target_before_training(monkeypatch, capsys):
    import bench_label_free_selection
    monkeypatch.setattr(bench_label_free_selection, 'run_all', lambda *a: pytest.fail('trained'))
    monkeypatch.setattr(sys, 'argv', ['bench_label_free_selection.py', '--targets', 'mnist', '--seeds', '0'])
    with pytest.raises(SystemExit):
        bench_label_free_selection.main()
    assert '--targets: the rules are graded leaving one target out' in capsys.readouterr().err


def test_kernel_study_refuses_a_run_without_a_branch_naming_it(monkeypatch, tmp_path):
    import safetensors.torch
    import yaml
    import bench_dida_kernels
    run = tmp_path / 'mnistm_style-FixMatch-s0'
    run.mkdir()
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='digitnet_compact', model_kwargs={})))
    safetensors.torch.save_file(timm.create_model('digitnet_compact').state_dict(), str(run / 'model.safetensors'))
    (run / 'results.json').write_text('{}')
    monkeypatch.setattr(sys, 'argv', ['bench_dida_kernels.py', str(run)])
    with pytest.raises(SystemExit, match=f'error: no DIDA branch in the model of {run}'):
        bench_dida_kernels.main()
