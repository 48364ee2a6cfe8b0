"""Options that make no sense are refused where they are parsed: `error: --option: why`, exit 2."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dida_timm.arguments import usable_device, yaml_value
from dida_timm.data import default_domains
from dida_timm.inference import main as predict_main

from dida_timm.training import options as train  # train.py's parser

REPO = Path(__file__).resolve().parents[1]


def _refused(parse, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        parse()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f'error: {option}: ' in err or f'error: argument {option}: ' in err, err  # ours, or argparse's own
    return err


@pytest.mark.parametrize('argv, option', [
    (['--epochs', '-1'], '--epochs'),
    (['--epochs', '0'], '--epochs'),
    (['--source-only-epochs', '-2'], '--source-only-epochs'),
    (['--unlabelled-weight', '-1'], '--unlabelled-weight'),
    (['--unlabelled-weight', 'inf'], '--unlabelled-weight'),
    (['--keep-checkpoints', '0'], '--keep-checkpoints'),
    (['--cutout', '64'], '--cutout'),
    (['--cutout', '32'], '--cutout'),
    (['--cutout', '-1'], '--cutout'),
    (['--model', 'dida_resnet18', '--input-size', '7'], '--input-size'),
    (['--input-size', '0'], '--input-size'),
    (['--source', 'mnist', 'mnist'], '--source'),
    (['--source', 'mnist', '--target', 'mnist'], '--target'),
    (['--source', 'mnist', '--target', 'mnist_m'], '--target'),
    (['--source', 'photo'], '--source'),
    (['--threshold', '1.5'], '--threshold'),
    (['--lr', '-0.1'], '--lr'),
    (['--lr', 'nan'], '--lr'),
    (['--batch-size', '0'], '--batch-size'),
    (['--eval-batch-size', '0'], '--eval-batch-size'),
    (['--new-lr-scale', '-1'], '--new-lr-scale'),
    (['--momentum', '1'], '--momentum'),
    (['--opt', 'adamw', '--lr', '0.001', '--opt-betas', '0.9', '1.0'], '--opt-betas'),  # sgd refuses any betas
    (['--weight-decay=-1e-4'], '--weight-decay'),
    (['--warmup-epochs', '10'], '--warmup-epochs'),
    (['--source-only-epochs', '2', '--warmup-epochs', '2'], '--warmup-epochs'),
    (['--lr', '1e-6', '--warmup-epochs', '1'], '--warmup-epochs'),  # timm warms up from 1e-5: down to the lr
    (['--min-lr', '1'], '--min-lr'),
    (['--sched', 'constant', '--min-lr', '0.001'], '--min-lr'),  # timm's step schedules ignore it
    (['--sched', 'step', '--decay-epochs', '5', '--min-lr', '0.001'], '--min-lr'),
    (['--no-pseudo-label-dropout'], '--no-pseudo-label-dropout'),  # the joint pass has no pass of its own
    (['--clip-grad', '0'], '--clip-grad'),
    (['--ema-decay', '1'], '--ema-decay'),
    (['--translate', '2'], '--translate'),
    (['--rand-augment', 'nonsense'], '--rand-augment'),
    (['--workers', '-1'], '--workers'),
    (['--offline-train-size', '5'], '--offline-train-size'),
    (['--offline-test-size', '0'], '--offline-test-size'),
    (['--dataset', 'pacs', '--data-dir', 'x', '--offline-test-size', '100'], '--offline-test-size'),  # ignored
    (['--dist-timeout', '0'], '--dist-timeout'),
    (['--dist-timeout', '1e10'], '--dist-timeout'),  # overflowed the process group's timeout
    (['--seed', '-1'], '--seed'),
    (['--seed', '4294967296'], '--seed'),  # overflowed torch.manual_seed once training started
    (['--model-kwargs', '{num_classes: 10}'], '--model-kwargs'),  # a raw TypeError after the data were built
    (['--model-kwargs', '{pretrained: true}'], '--model-kwargs'),
    (['--model-kwargs', "{global_pool: ''}"], '--model-kwargs'),  # feature maps, not logits
    (['--model', 'resnet18', '--model-kwargs', "{global_pool: ''}"], '--model-kwargs'),  # its head's forward fails
    (['--model-kwargs', '{in_chans: 1}'], '--model-kwargs'),  # the run's images are RGB
    (['--model-kwargs', '{features_only: true}'], '--model-kwargs'),  # a list of feature maps
    (['--sched', 'step'], '--sched'),  # timm's default decays at epoch 90: never in a 10-epoch phase
    (['--sched', 'multistep'], '--sched'),
    (['--sched', 'step', '--decay-epochs', '10'], '--decay-epochs'),  # the default phase has 10 epochs
    (['--sched', 'multistep', '--decay-milestones', '5', '25'], '--decay-milestones'),
    (['--decay-epochs', '5'], '--decay-epochs'),  # the cosine schedule has no decay epochs
    (['--sched', 'step', '--decay-epochs', '5', '--decay-rate', '0'], '--decay-rate'),
    (['--decay-rate', '0.5'], '--decay-rate'),  # cosine has none: it would be ignored
    (['--sched', 'rsqrt'], '--sched rsqrt'),  # timm's timescale is the warm-up: it raised once the data were built
    (['--sched', 'multistep', '--decay-milestones', '8', '4'], '--decay-milestones'),  # timm bisects: wrong lrs
    (['--tsne-per-domain', '-1'], '--tsne-per-domain'),
    (['--tsne-per-domain', '1'], '--tsne-per-domain'),  # 5 points: scikit-learn refused them after training
    (['--model-kwargs', '[1, 2]'], '--model-kwargs'),
    (['--model', 'no_such_model'], '--model'),
    (['--resume'], '--resume'),
    (['--output', 'README.md'], '--output'),  # a file: the run folder could not be made inside it
    (['--init-checkpoint', 'no/such/file.safetensors'], '--init-checkpoint'),
    (['--target-dir', 'no/such/folder'], '--target-dir'),
    (['--target-eval-dir', 'tests'], '--target-eval-dir'),
    (['--source-val-fraction', '0'], '--source-val-fraction'),
    (['--target-val-fraction', '1'], '--target-val-fraction'),
    (['--val-max-images', '0'], '--val-max-images'),
    (['--device', 'gpu'], '--device'),
    (['--mixstyle-after', 'no_such_module'], '--mixstyle-after'),
    (['--opt', 'no_such_optimizer'], '--opt'),
    (['--opt', 'sgd', '--opt-betas', '0.9', '0.99'], '--opt-betas'),  # timm would drop them silently
    (['--opt', 'lookahead_sgd', '--opt-betas', '0.9', '0.99'], '--opt-betas'),
    (['--opt', 'adamw', '--lr', '0.001', '--momentum', '0.5'], '--momentum'),  # timm would ignore it silently
    (['--opt', 'lookahead_nadam', '--lr', '0.001', '--momentum', '0.5'], '--momentum'),
    (['--sched', 'plateau'], '--sched'),  # steps on a per-epoch metric, not per update
    (['--sched', 'none'], '--sched'),  # would drop the branch's lr scale
    (['--device', 'cuda:99'], '--device'),  # no GPU, or fewer than 100
])
def test_train_refuses_a_value_that_makes_no_sense(argv, option, capsys):
    _refused(lambda: train.parse_args(argv), capsys, option)


@pytest.mark.parametrize('config, option, says', [
    ('epochs: -1', '--epochs', 'must be >= 1'),
    ('source: [mnist, mnist]', '--source', 'mnist given twice'),
    ('cutout: 64', '--cutout', 'covers the whole 32 px input'),
    ('lr: fast', '--lr', 'must be a number'),
    ('batch_size: 2.5', '--batch-size', 'must be an integer'),
    ('flip: maybe', '--flip', 'must be true or false'),
    ('method: supervised', '--method', "'supervised' is not one of"),
    ('{opt: adamw, lr: 0.001, opt_betas: [0.9]}', '--opt-betas', 'needs 2 values'),
    ('target: [svhn_style, mnist]', '--target', 'takes one value'),
])
def test_a_config_file_is_checked_like_the_command_line(config, option, says, tmp_path, capsys):
    path = tmp_path / 'config.yaml'
    path.write_text(config + '\n')
    assert says in _refused(lambda: train.parse_args(['-c', str(path)]), capsys, option)


def test_model_kwargs_that_are_not_yaml_are_refused_quoting_them(capsys):
    err = _refused(lambda: train.parse_args(['--model-kwargs', '{dida_reduction: [8}']), capsys, '--model-kwargs')
    assert "not valid YAML: '{dida_reduction: [8}'" in err  # was a yaml traceback


@pytest.mark.parametrize('kwargs', ['{drop_rate}', 'drop_rate:', '{drop_rate: 0.1, dida_reduction: null}'])
def test_a_model_kwarg_without_a_value_is_refused(kwargs, capsys):
    # YAML reads the key's value as None, which timm.create_model silently drops
    err = _refused(lambda: train.parse_args(['--model-kwargs', kwargs]), capsys, '--model-kwargs')
    assert 'given without a value' in err


def test_a_config_key_set_to_null_is_refused_unless_its_default_is_none(tmp_path, capsys):
    path = tmp_path / 'config.yaml'
    path.write_text('lr: null\n')  # was a TypeError comparing None with --min-lr
    err = _refused(lambda: train.parse_args(['-c', str(path)]), capsys, '--lr')
    assert '`lr: null` is not a value' in err and str(path) in err
    path.write_text('input_size: null\nmodel_kwargs: null\n')
    err = _refused(lambda: train.parse_args(['-c', str(path)]), capsys, '--model-kwargs')
    assert '`model_kwargs: null`' in err
    path.write_text('input_size: null\ntarget: null\n')  # None is their default: the model's and dataset's own
    args = train.parse_args(['-c', str(path)])
    assert args.input_size == 32 and args.target == 'mnistm_style'


def test_a_config_naming_another_config_is_refused(tmp_path, capsys):
    (tmp_path / 'base.yaml').write_text('epochs: 3\n')
    path = tmp_path / 'config.yaml'
    path.write_text(f'config: {tmp_path / "base.yaml"}\nlr: 0.01\n')  # base.yaml was silently not read
    err = _refused(lambda: train.parse_args(['-c', str(path)]), capsys, '--config')
    assert f'{path} names another config' in err


def test_a_second_config_is_refused(tmp_path, capsys):
    first, second = tmp_path / 'first.yaml', tmp_path / 'second.yaml'
    first.write_text('epochs: 3\n')
    second.write_text('lr: 0.01\n')  # only the last one given was read
    err = _refused(lambda: train.parse_args(['-c', str(first), '--config', str(second)]), capsys, '--config')
    assert f'given 2 times ({first}, {second})' in err
    assert train.parse_args(['-c', str(first)]).config == str(first) and train.parse_args([]).config == ''


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    path = tmp_path / 'config.yaml'
    path.write_text('lr: 0.01\nepochs: 3\nlr: 0.02\n')  # yaml.safe_load kept the last lr without a word
    err = _refused(lambda: train.parse_args(['-c', str(path)]), capsys, '--config')
    assert str(path) in err and "key 'lr' given twice" in err
    err = _refused(lambda: train.parse_args(['--model-kwargs', '{dida_reduction: 4, dida_reduction: 8}']), capsys,
                   '--model-kwargs')
    assert "key 'dida_reduction' given twice" in err
    # a merged mapping's keys are not given twice: the mapping's own override them
    assert yaml_value('base: &b {x: 1, y: 2}\nrun: {<<: *b, x: 3}')['run'] == {'x': 3, 'y': 2}


def test_config_values_are_converted_as_the_command_line_would(tmp_path):
    path = tmp_path / 'config.yaml'
    path.write_text('lr: 1e-3\nsource: uci_digits\ntarget: mnist\n')  # YAML reads 1e-3 as a string
    args = train.parse_args(['-c', str(path)])
    assert args.lr == 0.001 and args.source == ['uci_digits'] and args.target == 'mnist'


def test_every_strong_view_the_help_names_is_accepted():
    assert train.parse_args(['--rand-augment', 'fixmatch']).rand_augment == 'fixmatch'
    assert train.parse_args(['--rand-augment', 'rand-m5-n2-mstd0.5']).rand_augment == 'rand-m5-n2-mstd0.5'
    assert train.parse_args(['--rand-augment', '']).rand_augment == ''


def test_defaults_record_the_resolved_input_size():
    assert train.parse_args([]).input_size == 32
    assert train.parse_args(['--model', 'dida_resnet18']).input_size == 224


def test_each_dataset_gives_its_own_default_domains():
    args = train.parse_args([])
    assert args.target == 'mnistm_style' and args.source == ['mnist', 'syn_style', 'svhn_style', 'uci_digits']
    args = train.parse_args(['--dataset', 'pacs', '--data-dir', 'not/read/yet', '--model', 'dida_resnet18'])
    assert args.target == 'art_painting' and args.source == ['cartoon', 'photo', 'sketch']
    args = train.parse_args(['--dataset', 'digit_five', '--data-dir', 'x', '--target', 'svhn'])
    assert args.source == ['mnist', 'mnist_m', 'syn', 'usps']
    assert default_domains('domainnet', None, sources=['real']) == (['real'], 'clipart')


def test_an_unknown_domain_is_refused_with_the_valid_names(capsys):
    err = _refused(lambda: train.parse_args(['--dataset', 'pacs', '--data-dir', 'x', '--target', 'mnist']), capsys,
                   '--target')
    assert "'mnist' not a domain of pacs; its domains are ['art_painting', 'cartoon', 'photo', 'sketch']" in err


def test_folder_domains_are_the_sub_folders_and_must_be_chosen(tmp_path, capsys):
    for domain in ('clipart', 'photos'):
        (tmp_path / domain).mkdir()
    args = train.parse_args(['--dataset', 'folder', '--data-dir', str(tmp_path), '--source', 'clipart',
                             '--target', 'photos'])
    assert args.source == ['clipart'] and args.target == 'photos'
    err = _refused(lambda: train.parse_args(['--dataset', 'folder', '--data-dir', str(tmp_path)]), capsys,
                   '--source/--target')
    assert "['clipart', 'photos']" in err
    _refused(lambda: train.parse_args(['--dataset', 'folder', '--data-dir', str(tmp_path), '--source', 'sketches',
                                       '--target', 'photos']), capsys, '--source')


@pytest.mark.parametrize('script, argv, option', [
    ('bench/bench_label_free_selection.py', ['--seeds', '0', '0'], '--seeds'),
    ('bench/bench_label_free_selection.py', ['--jobs', '0'], '--jobs'),
    ('bench/bench_uda_accuracy.py', ['--seeds', '0', '0'], '--seeds'),
    ('bench/bench_uda_accuracy.py', ['--jobs', '0'], '--jobs'),
    ('bench/bench_uda_accuracy.py', ['--seeds', '-1'], '--seeds'),
    ('bench/bench_uda_accuracy.py', ['--targets', 'mnist', 'mnist'], '--targets'),
    ('bench/bench_uda_accuracy.py', ['--branch-kwargs', '{dida_reduction: [8}'], '--branch-kwargs'),
    ('bench/bench_cost.py', ['--reps', '1'], '--reps'),  # the ratios' quartiles need two rounds
    ('bench/bench_cost.py', ['--generic', 'no_such_cnn'], '--generic'),
    ('bench/bench_cost.py', ['--reparameterize', '--branch-only'], '--reparameterize'),
    ('bench/bench_cost.py', ['--depths', '18', '18'], '--depths'),
    ('bench/bench_cost.py', ['--depths', '18', '--train-depths', '50'], '--train-depths'),
    ('bench/bench_cost.py', ['--batch-scale', '0'], '--batch-scale'),
    ('bench/bench_cost.py', ['--batch-size', '1'], '--batch-size'),
    ('bench/bench_cost.py', ['--batch-size', '2', '--batch-scale', '2'], '--batch-size'),
    ('bench/bench_cost.py', ['--triton'], '--triton'),  # on a CPU the kernels run in Triton's interpreter only
    ('bench/bench_cost.py', ['--branch-only', '--models-only'], '--branch-only'),
    ('bench/bench_cost.py', ['--device', 'cuda:99'], '--device'),
    ('bench/bench_step_profile.py', ['--device', 'cpu', '--models', 'resnet18'], '--models'),
    ('bench/bench_step_profile.py', ['--device', 'cpu', '--reps', '1'], '--reps'),
    ('bench/bench_step_profile.py', ['--device', 'cpu', '--steps', '0'], '--steps'),
    ('bench/bench_step_profile.py', ['--device', 'cuda:99'], '--device'),
    ('bench/bench_branch_parts.py', ['--reps', '2'], '--reps'),
    ('bench/bench_branch_parts.py', ['--batch-size', '1'], '--batch-size'),
    ('bench/bench_branch_parts.py', ['--device', 'cuda:99'], '--device'),
    ('bench/bench_branch_parts.py', ['--triton'], '--triton'),
    ('bench/bench_branch_parts.py', ['--model', 'resnet18'], '--model'),
    ('bench/bench_branch_parts.py', ['--model', 'resnet18', '--static', 'resnet18', '--img-size', '32'], '--model'),
    ('bench/bench_unit_versions.py', ['--rev', 'HEAD', '--reps', '1'], '--reps'),
    ('bench/bench_generic_cost.py', ['--reps', '1'], '--reps'),
    ('bench/bench_dida_ablations.py', ['--seeds', '1', '1'], '--seeds'),
    ('bench/bench_dida_ablations.py', ['--jobs', '0'], '--jobs'),
    ('bench/bench_loader_memory.py', ['--workers', '-1'], '--workers'),
    ('bench/bench_loader_memory.py', ['--batch-size', '0'], '--batch-size'),
    ('bench/bench_generic_cost.py', ['--models', 'vit_tiny_patch16_224'], '--models'),
    ('bench/bench_generic_cost.py', ['--train-batch', '64'], '--train-batch'),
    ('bench/bench_unit_versions.py', ['--rev', 'HEAD', '--batch-size', '1'], '--batch-size'),
    ('bench/bench_unit_versions.py', ['--rev', 'HEAD', '--device', 'cuda:99'], '--device'),
    ('hub/export.py', ['run', 'run', '--out', 'x', '--repo-name', 'org/name'], 'runs'),
    ('hub/export.py', ['run', '--out', 'x', '--repo-name', 'no-org'], '--repo-name'),
    ('hub/export.py', ['run', '--out', 'README.md', '--repo-name', 'org/name'], '--out'),  # a file, not a folder
    ('hub/push.py', ['folder', '--repo-id', 'a/b/c'], '--repo-id'),
])
def test_bench_and_hub_commands_refuse_what_makes_no_sense(script, argv, option, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [script] + argv)
    _refused(lambda: runpy.run_path(str(REPO / script), run_name='__main__'), capsys, option)


def test_gpu_checks_refuse_an_unknown_step_before_running_anything(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run(['bash', str(REPO / 'bench/gpu_checks.sh'), str(out), 'eager', 'bogus'], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'unknown step: bogus' in proc.stderr
    assert not out.exists()  # nothing ran, not even the version check


def test_gpu_checks_keep_the_callers_python_path(tmp_path):
    """Packages carried to a GPU machine that lacks them (a path the caller exports) stay importable after the
    checkout: the script's Python is a stand-in here that prints the path it was given."""
    python = tmp_path / 'python'
    python.write_text('#!/bin/sh\necho "path=$PYTHONPATH"\n')
    python.chmod(0o755)
    env = {**os.environ, 'PYTHON': str(python), 'PYTHONPATH': '/carried/site'}
    proc = subprocess.run(['bash', str(REPO / 'bench/gpu_checks.sh'), str(tmp_path / 'out'), 'eager'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ('versions', 'eager'):
        assert (tmp_path / 'out' / f'{step}.txt').read_text().strip() == f'path={REPO}:/carried/site'


def test_gpu_checks_mark_a_failed_step_and_run_the_others(tmp_path):
    """A step that fails or runs out of time must not read as a complete table: its file says so, the later steps
    still run, and the script exits 1 (a stand-in Python: the version check passes, every step prints a line and
    fails)."""
    python = tmp_path / 'python'
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "half a table"\nexit 3\n')
    python.chmod(0o755)
    env = {**os.environ, 'PYTHON': str(python)}
    proc = subprocess.run(['bash', str(REPO / 'bench/gpu_checks.sh'), str(tmp_path / 'out'), 'eager', 'parts'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and 'failed steps: eager parts' in proc.stderr
    for step in ('eager', 'parts'):
        assert (tmp_path / 'out' / f'{step}.txt').read_text().splitlines() == ['half a table', f'## {step} exited 3']


@pytest.mark.parametrize('argv, option', [
    (['--batch-size', '0'], '--batch-size'),
    (['--topk', '0'], '--topk'),
    (['--topk', '11'], '--topk'),
    (['--workers', '-1'], '--workers'),
    (['--images', 'no/such/folder'], '--images'),
    (['--device', 'cuda:99'], '--device'),
    (['--output', str(REPO)], '--output'),  # a folder: the CSV could not be written
])
def test_predict_command_refuses_what_makes_no_sense(argv, option, tmp_path, capsys):
    (tmp_path / 'images').mkdir()
    base = ['--model', 'dida_digitnet_compact.offline_mnist', '--images', str(tmp_path / 'images'), '--output',
            str(tmp_path / 'preds.csv')]
    _refused(lambda: predict_main(base + argv), capsys, option)


def test_a_target_folder_named_like_a_source_domain_is_refused(tmp_path, capsys):
    (tmp_path / 'mnist').mkdir()
    err = _refused(lambda: train.parse_args(['--target-dir', str(tmp_path / 'mnist')]), capsys, '--target-dir')
    assert "named like the source domain 'mnist'" in err
    args = train.parse_args(['--target-dir', str(tmp_path / 'mnist'), '--source', 'syn_style', 'svhn_style'])
    assert args.source == ['syn_style', 'svhn_style']


def test_a_device_is_checked_against_the_machine():
    assert usable_device('cpu') is None and usable_device(None) is None
    assert 'not a torch device' in usable_device('gpu')
    if torch.cuda.is_available():
        assert usable_device('cuda') is None and usable_device('cuda:0') is None
        assert 'this machine has' in usable_device(f'cuda:{torch.cuda.device_count()}')
    else:
        assert usable_device('cuda') == 'no cuda device on this machine (cpu only)'


@pytest.mark.parametrize('argv', [['--sched', 'step', '--decay-epochs', '5'],
                                  ['--sched', 'multistep', '--decay-milestones', '5', '15']])
def test_step_schedules_decay_where_their_options_say(argv):
    args = train.parse_args(argv + ['--decay-rate', '0.5', '--epochs', '20'])
    optimizer = train.create_optimizer([torch.nn.Parameter(torch.zeros(1))], args)
    scheduler = train.create_scheduler(optimizer, args, epochs=20, updates_per_epoch=10)
    lrs = []
    for update in (0, 49, 50, 149, 150):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]['lr'])
    # timm's multistep decays one update before each milestone (its documented convention)
    expected = [1, 1, 0.5, 0.25, 0.125] if argv[1] == 'step' else [1, 0.5, 0.5, 0.25, 0.25]
    assert lrs == pytest.approx([args.lr * f for f in expected])


def test_options_naming_the_same_path_are_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'target').mkdir()
    assert train.differing_options({'target_dir': 'target', 'lr': 0.1},
                                   {'target_dir': str(tmp_path / 'target') + '/', 'lr': 0.1}) == []
    assert train.differing_options({'target_dir': 'target', 'lr': 0.1, 'old_option': 1},
                                   {'target_dir': 'other', 'lr': 0.2, 'workers': 4}) == [
        "--target-dir 'target' -> 'other'", '--lr 0.1 -> 0.2']


@pytest.mark.parametrize('config, option', [
    ('opt: adam\nlr: 0.001\nmomentum: 0.5', '--momentum'),  # adam takes none: accepted from a config only
    ('decay_rate: 0.5', '--decay-rate'),  # cosine has none
    ('dataset: pacs\ndata_dir: x\nmodel: resnet18\noffline_test_size: 100', '--offline-test-size'),
])
def test_a_config_value_is_refused_where_the_same_on_the_command_line_is(config, option, tmp_path, capsys):
    # the checks asked the parser for the option's default, which a config's values had replaced
    path = tmp_path / 'config.yaml'
    path.write_text(config + '\n')
    _refused(lambda: train.parse_args(['-c', str(path)]), capsys, option)


@pytest.mark.parametrize('argv, option', [
    (['--soft-weighting'], '--soft-weighting'),
    (['--unlabelled-stream', 'source+target'], '--unlabelled-stream'),
    (['--forward-mode', 'separate'], '--forward-mode'),
    (['--unlabelled-weight', '0.5'], '--unlabelled-weight'),
    (['--forward-mode', 'separate', '--no-pseudo-label-dropout'], '--forward-mode'),
    (['--rand-augment', 'fixmatch'], '--rand-augment'),
    (['--cutout', '8'], '--cutout'),
    (['--select', 'guarded_estimate'], '--select'),
    (['--source-only-epochs', '2'], '--source-only-epochs'),  # a second source-only phase, its lr schedule restarted
])
def test_a_source_only_run_refuses_what_only_adaptation_uses(argv, option, capsys):
    err = _refused(lambda: train.parse_args(['--method', 'source_only'] + argv), capsys, option)
    line = err.splitlines()[-1]
    assert '--method source_only' in line or 'a source-only run' in line, line
    if option in ('--forward-mode', '--soft-weighting'):
        assert 'only FixMatch uses' in err
    if option == '--source-only-epochs':
        assert 'give its length with --epochs, e.g. --epochs 12' in err


def test_a_source_only_run_takes_what_it_uses():
    # --select last is what it does (the bench studies give it to every run); the label-free scores of every
    # epoch count the pseudo-labels FixMatch would keep at --threshold; --cutout is not held to an input it never cuts
    args = train.parse_args(['--method', 'source_only', '--select', 'last', '--threshold', '0.8',
                             '--model', 'digitnet_compact', '--input-size', '16'])
    assert (args.select, args.threshold, args.input_size) == ('last', 0.8, 16)


@pytest.mark.parametrize('config', ['domainnet.yaml', 'offline_digits_cpu.yaml'])
def test_a_published_recipe_runs_its_source_only_baseline_with_its_fixmatch_options_left_unused(config):
    # the recipe's soft weighting, RandAugment, cutout and source-only phase are part of the recipe, not a mistake of
    # this command (the bench studies run every source-only baseline so); its threshold still sets the label-free
    # keep rates of a source-only run
    path = str(REPO / 'train' / 'configs' / config)
    args = train.parse_args(['-c', path, '--method', 'source_only', '--threshold', '0.8'])
    assert args.method == 'source_only' and args.threshold == 0.8


def test_a_run_started_before_the_combination_checks_resumes(tmp_path):
    # its args.yaml holds what is refused now; a resume must take it as it is (dropping it would change the run)
    args = train.parse_args(['--soft-weighting', '--source-only-epochs', '1'])
    saved = dict(vars(args), threshold=0.9)
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(dict(saved, method='source_only', select='guarded_estimate'), sort_keys=False))
    resumed = train.parse_args(['-c', str(path), '--resume', '--experiment', 'run'])
    assert (resumed.threshold, resumed.select, resumed.source_only_epochs) == (0.9, 'guarded_estimate', 1)
    resumed = train.parse_args(['--soft-weighting', '--threshold', '0.9', '--resume', '--experiment', 'run'])
    assert resumed.threshold == 0.9


def test_a_threshold_is_refused_with_soft_weighting_which_drops_no_pseudo_label(capsys):
    err = _refused(lambda: train.parse_args(['--soft-weighting', '--threshold', '0.8']), capsys, '--threshold')
    assert 'would change nothing' in err
    assert train.parse_args(['--soft-weighting']).soft_weighting


def test_domainnet_config_sets_no_threshold_its_soft_weighting_ignores():
    config = yaml_value((REPO / 'train' / 'configs' / 'domainnet.yaml').read_text())
    assert config['soft_weighting'] and 'threshold' not in config


def test_a_second_order_optimizer_is_refused(capsys):
    err = _refused(lambda: train.parse_args(['--opt', 'adahessian', '--lr', '0.01']), capsys, '--opt')
    assert 'second-order optimizer' in err  # loss.backward() without create_graph failed at the first step


def test_a_zero_momentum_with_nesterov_sgd_names_momentum_and_the_alternative(capsys):
    err = _refused(lambda: train.parse_args(['--momentum', '0']), capsys, '--momentum')
    assert "timm's sgd is Nesterov SGD, which needs a momentum > 0; use --opt momentum" in err
    assert train.parse_args(['--opt', 'momentum', '--momentum', '0']).momentum == 0


def _flags():
    """(dest, built-in default) of every on/off option of train.py."""
    actions = train.build_parser()._actions
    return sorted({a.dest: a.default for a in actions if a.nargs == 0 and a.dest != 'help'}.items())


@pytest.mark.parametrize('dest, default', _flags(), ids=[dest for dest, _ in _flags()])
def test_every_flag_a_config_sets_can_be_set_back_on_the_command_line(dest, default, tmp_path):
    # --config's help says CLI flags override it: store_true flags had no --no- form to undo a config's `true`
    parser = train.build_parser()
    options = [o for a in parser._actions if a.dest == dest for o in a.option_strings]
    back = [o for o in options if getattr(parser.parse_args([o]), dest) == default]
    assert back, f'{dest}: no option sets it to {default}'
    path = tmp_path / 'config.yaml'
    path.write_text(f'{dest}: {str(not default).lower()}\n')
    assert getattr(train.parse_args(['-c', str(path), back[0]]), dest) is default


def test_poly_takes_a_decay_power_above_one_and_step_a_factor_up_to_one(capsys):
    assert train.parse_args(['--sched', 'poly', '--decay-rate', '2']).decay_rate == 2  # timm: the poly power
    err = _refused(lambda: train.parse_args(['--sched', 'step', '--decay-epochs', '5', '--decay-rate', '2']), capsys,
                   '--decay-rate')
    assert 'with --sched step it is the lr factor of each decay: must be in (0, 1]' in err
    _refused(lambda: train.parse_args(['--sched', 'poly', '--decay-rate', '0']), capsys, '--decay-rate')


@pytest.mark.parametrize('argv', [[], ['--method', 'source_only', '--select', 'last'],
                                  ['-c', str(Path(__file__).resolve().parents[1] / 'train/configs/pacs.yaml')]])
def test_a_runs_own_args_yaml_parses_to_resume_it(argv, tmp_path):
    # the resume error's advice, `train.py -c RUN/args.yaml --resume`: args.yaml records `config: ''` (or the config
    # the run read, besides every option), which was refused as naming another config
    args = train.parse_args(argv)
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(vars(args), sort_keys=False))  # as run.py writes it
    resumed = train.parse_args(['-c', str(path), '--resume', '--experiment', 'run'])
    assert resumed.resume and resumed.config == str(path)
    assert train.changed_run_options(yaml.safe_load(path.read_text()), resumed) == []


def test_a_resume_may_change_where_and_how_fast_a_run_goes_but_not_what_it_computes():
    saved = yaml.safe_load(yaml.safe_dump(vars(train.parse_args([])), sort_keys=False))
    free = ['--resume', '--experiment', 'run', '--eval-batch-size', '7', '--keep-checkpoints', '1', '--no-progress', '--deterministic']
    assert train.changed_run_options(saved, train.parse_args(free)) == []
    # checkpointed blocks rerun their forward in train mode: their batch norms' running statistics move twice
    assert train.changed_run_options(saved, train.parse_args(['--resume', '--experiment', 'run', '--grad-checkpointing'])) == [
        '--grad-checkpointing False -> True']


def test_a_config_naming_another_config_is_refused_unless_it_records_every_option(tmp_path, capsys):
    path = tmp_path / 'nested.yaml'
    path.write_text('config: other.yaml\nlr: 0.1\n')
    assert 'names another config' in _refused(lambda: train.parse_args(['-c', str(path)]), capsys, '--config')


def test_new_layers_train_at_ten_times_a_pretrained_backbones_rate_unless_told():
    # the paper's recipe; the default was 1 whatever the backbone, so a pretrained run's fresh branch and classifier
    # trained at the backbone's small rate
    assert train.parse_args(['--model', 'dida_resnet18.tv_in1k', '--pretrained']).new_lr_scale == 10.0
    assert train.parse_args(['--model', 'dida_resnet18']).new_lr_scale == 1.0
    assert train.parse_args(['--model', 'dida_resnet18.tv_in1k', '--pretrained', '--new-lr-scale', '1']
                            ).new_lr_scale == 1.0
