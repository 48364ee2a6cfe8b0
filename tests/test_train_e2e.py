"""End-to-end runs of train/train.py on small offline data: adaptation helps, resume is exact, DDP works."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import dida_timm  # noqa: F401  registers the models
from dida_timm.layers import is_branch_parameter

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'train' / 'train.py'
SIZES = ['--offline-train-size', '320', '--offline-test-size', '200']  # refused with another --dataset
TINY = SIZES + ['--batch-size', '16', '--no-progress', '--tsne-per-domain', '60']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A cache folder for the small offline benchmark, shared by the runs of this module."""
    return tmp_path_factory.mktemp('offline_cache')


def _train(args, out: Path, data_dir: Path, check=True, tiny: Sequence[str] = TINY, **popen):
    cmd = [sys.executable, str(TRAIN), '--output', str(out), '--data-dir', str(data_dir)] + list(tiny) + args
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_adaptation_improves_target_accuracy_over_its_source_only_start(tmp_path, data_dir):
    # MNIST -> MNIST-M-style: the source-only model recognises only part of the target; the confident part
    # carries pseudo-labels to the rest (prototype: 68.5 -> 83.6 at full size)
    result = _train(['--model', 'dida_digitnet_compact', '--source', 'mnist', '--target', 'mnistm_style',
                     '--source-only-epochs', '4', '--epochs', '4', '--lr', '0.05', '--experiment', 'adapt'],
                    tmp_path, data_dir)
    results = json.loads((tmp_path / 'adapt' / 'results.json').read_text())
    assert results['dida_kernels'] == 'eager'  # no DIDA_TRITON=1
    start, final = results['source_only_start_target_accuracy'], results['last_target_accuracy']
    assert final > start + 3, f'adaptation did not help: {start:.1f} -> {final:.1f}\n{result.stdout[-2000:]}'
    assert '| source-only start | last epoch | selected | estimated, ATC (label-free) | estimated, COT (label-free) | ' \
        'selected epoch, rule |' in result.stdout
    # the reported accuracy is the selected checkpoint's, whichever epoch that is
    chosen = next(h for h in results['history'] if h['epoch'] == results['selection']['epoch'])
    assert results['target_accuracy'] == pytest.approx(chosen['target_accuracy'])
    for picture in ('confusion_matrix.png', 'tsne.png', 'curves.png'):
        assert (tmp_path / 'adapt' / picture).stat().st_size > 10_000
    assert set(results['per_domain_accuracy']) == {'mnist', 'mnistm_style'}
    assert len(results['history']) == 8 and results['history'][-1]['phase'] == 'fixmatch'


def _weights(folder: Path):
    return safetensors.torch.load_file(str(folder / 'model.safetensors'))


def _kill_after_checkpoint(proc: subprocess.Popen, run: Path, epoch: int) -> None:
    """SIGKILL the run `proc` (its own process group) as soon as its checkpoint of `epoch` is `last`."""
    last = run / 'checkpoints' / 'last'
    deadline = time.time() + 300
    while not (last.exists() and last.read_text().strip() == f'epoch-{epoch:04d}') and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / 'results.json').exists()


def test_a_run_named_by_the_clock_resumes_by_that_name(tmp_path, data_dir):
    common = ['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0', '--epochs', '1']
    _train(common, tmp_path, data_dir)
    run, = [p for p in tmp_path.iterdir() if (p / 'results.json').exists()]
    (run / 'results.json').unlink()
    result = _train(common + ['--experiment', run.name, '--resume'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout and (run / 'results.json').exists()


def test_a_run_started_with_relative_folders_resumes_from_another_directory(tmp_path, data_dir):
    # args.yaml recorded the folders as typed: from elsewhere, `-c RUN/args.yaml --resume` looked for them there
    (tmp_path / 'start').mkdir()
    (tmp_path / 'elsewhere').mkdir()
    cache = os.path.relpath(data_dir, tmp_path / 'start')
    first = subprocess.run([sys.executable, str(TRAIN), '--output', 'out', '--data-dir', cache, *TINY, '--source',
                            'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0', '--epochs', '1',
                            '--experiment', 'run'], cwd=tmp_path / 'start', capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / 'start' / 'out' / 'run'
    (run / 'results.json').unlink()  # as a run killed after its last checkpoint leaves it
    again = subprocess.run([sys.executable, str(TRAIN), '-c', '../start/out/run/args.yaml', '--resume',
                            '--experiment', 'run'], cwd=tmp_path / 'elsewhere', capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed from' in again.stdout and (run / 'results.json').exists()


def test_resume_refuses_options_the_run_was_not_started_with(tmp_path, data_dir):
    # the checkpoint's scheduler and optimizer carry the schedule length and rates: resumed with more epochs, the
    # extra ones ran at the finished schedule's learning rate of 0 while results.json said 3 epochs
    common = ['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0', '--experiment', 'run']
    _train(common + ['--epochs', '1', '--select', 'last'], tmp_path, data_dir)
    result = _train(common + ['--epochs', '3', '--lr', '0.5', '--select', 'last', '--resume', '--workers', '1'],
                    tmp_path, data_dir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    # --workers too: each loader worker draws the random augmentations from its own generator
    assert f'--resume: the run in {tmp_path / "run"} was started with other options (--workers 0 -> 1; --epochs 1 ' \
           '-> 3; --lr 0.05 -> 0.5)' in result.stderr
    # the command the message gives resumes it
    own = re.search(r'resume it with its own \((.*?)\), or start another', result.stderr).group(1)
    result = _train(shlex.split(own) + ['--device', 'cpu'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout  # --device may change
    # the command that started the run is the one that reproduces it (the card's); the resume's is kept beside it
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    started, = json.loads((tmp_path / 'run' / 'commands.json').read_text())[:1]
    assert results['command'] == started and '--resume' not in started
    assert '--epochs 1 --select last' in started and results['resumed_with'] == [
        json.loads((tmp_path / 'run' / 'commands.json').read_text())[1]]
    assert '-c ' in results['resumed_with'][0] and '--resume' in results['resumed_with'][0]


def test_a_run_folder_in_use_or_with_a_cut_short_args_yaml_is_refused(tmp_path, data_dir):
    from dida_timm.training.run import hold_run_folder
    common = ['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0', '--experiment', 'run',
              '--epochs', '1']
    lock = hold_run_folder(tmp_path / 'run')  # as a run still going holds it
    result = _train(common, tmp_path, data_dir, check=False)
    assert result.returncode == 2 and f'{tmp_path / "run"} is in use by another train.py process' in result.stderr
    lock.close()
    _train(common, tmp_path, data_dir)
    lock = hold_run_folder(tmp_path / 'run')
    result = _train(common + ['--resume'], tmp_path, data_dir, check=False)
    assert result.returncode == 2 and 'is in use by another train.py process' in result.stderr
    lock.close()
    # a refused resume is not recorded as one of the run's commands
    assert len(json.loads((tmp_path / 'run' / 'commands.json').read_text())) == 1
    (tmp_path / 'run' / 'args.yaml').write_text('')  # a write cut short by an older version
    result = _train(common + ['--resume'], tmp_path, data_dir, check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f'{tmp_path / "run" / "args.yaml"} does not hold the options the run was started with' in result.stderr
    # nor does it pass as a config of no options (a run of the defaults in ./output)
    result = _train(['-c', str(tmp_path / 'run' / 'args.yaml'), '--resume', '--experiment', 'run'], tmp_path,
                    data_dir, check=False)
    assert result.returncode == 2 and 'holds no option (an empty file?)' in result.stderr


def test_resume_refuses_a_changed_target_folder_world_size_or_damaged_checkpoint_naming_it(tmp_path):
    from PIL import Image
    root, target = tmp_path / 'data', tmp_path / 'target'
    for label in ('0', '1'):
        (root / 'A' / label).mkdir(parents=True)
        for i in range(6):
            Image.new('RGB', (8, 8), (40 * i, 100 * int(label), 0)).save(root / 'A' / label / f'{i}.png')
    target.mkdir()
    for i in range(10):
        Image.new('RGB', (8, 8), (20 * i, 0, 90)).save(target / f'{i}.png')
    common = ['--dataset', 'folder', '--source', 'A', '--target-dir', str(target), '--batch-size', '4',
              '--source-only-epochs', '1', '--epochs', '1', '--keep-checkpoints', '2', '--experiment', 'run']
    tiny = ['--no-progress', '--tsne-per-domain', '0']
    # 2 of the 10 target images held out: fewer than 10 per class, where the collapse guard misreads chance
    assert 'the held-out target slice has 2 images, fewer than 20 (10 per class)' in _train(
        common, tmp_path, root, tiny=tiny).stdout
    run = tmp_path / 'run'
    (run / 'results.json').unlink()

    def resume():
        result = _train(common + ['--resume'], tmp_path, root, check=False, tiny=tiny)
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
        return result.stderr
    # images added to the target folder: another held-out slice, whose scores the run's reference does not match
    Image.new('RGB', (8, 8), (1, 2, 3)).save(target / 'new.png')  # like no source image: not a copy of one
    assert 'the target images held out for its label-free scores changed' in resume()
    (target / 'new.png').unlink()
    # one source image swapped for another: as many images and steps, but the held-out slice drawn anew among
    # images the run trained on
    os.replace(root / 'A' / '0' / '0.png', tmp_path / 'aside.png')
    Image.new('RGB', (8, 8), (0, 250, 0)).save(root / 'A' / '1' / '9.png')
    message = resume()
    assert 'the source images held out for its label-free scores changed' in message and 'steps' not in message
    (root / 'A' / '1' / '9.png').unlink()
    os.replace(tmp_path / 'aside.png', root / 'A' / '0' / '0.png')
    # resumed on another number of processes: the schedule counted steps per process
    state_file = run / 'checkpoints' / 'epoch-0002' / 'state.pt'
    state = torch.load(state_file, weights_only=True)
    torch.save(dict(state, resumable=dict(state['resumable'], world_size=2)), state_file)
    assert 'it ran on 2 process(es), now on 1' in resume()
    torch.save(state, state_file)
    # a checkpoint cut short: named, with the one before it
    weights = run / 'checkpoints' / 'epoch-0002' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    message = resume()
    assert f'--resume: cannot resume from {weights}' in message
    assert f"to resume from the one before, write epoch-0001 into {run / 'checkpoints' / 'last'}" in message


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('g++') is None, reason='inductor compiles C++ on CPU')
def test_compiled_run_saves_and_resumes_the_plain_model(tmp_path, data_dir):
    # torch.compile wraps the model: what is saved (checkpoints, the exported weights) must be the plain model's
    # state dict, which a compiled resume loads back
    common = ['--source', 'mnist', '--target', 'syn_style', '--compile', '--tsne-per-domain', '0',
              '--experiment', 'compiled', '--epochs', '2']
    _kill_after_checkpoint(_train(common, tmp_path, data_dir, start_new_session=True), tmp_path / 'compiled', 1)
    result = _train(common + ['--resume'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout and 'after epoch 1' in result.stdout
    model = timm.create_model('dida_digitnet_compact')
    model.load_state_dict(_weights(tmp_path / 'compiled'), strict=True)
    history = json.loads((tmp_path / 'compiled' / 'results.json').read_text())['history']
    assert [h['epoch'] for h in history] == [0, 1, 2]  # 0: the start, evaluated before adapting


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, data_dir):
    common = ['--source', 'mnist', 'uci_digits', '--target', 'syn_style', '--source-only-epochs', '1',
              '--epochs', '3', '--deterministic', '--tsne-per-domain', '0']
    _train(common + ['--experiment', 'straight'], tmp_path, data_dir)
    # mid-run: epoch 3 of 4 is under way
    _kill_after_checkpoint(_train(common + ['--experiment', 'killed'], tmp_path, data_dir, start_new_session=True),
                           tmp_path / 'killed', 2)
    result = _train(common + ['--experiment', 'killed', '--resume'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout
    straight, resumed = _weights(tmp_path / 'straight'), _weights(tmp_path / 'killed')
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), f'{name} differs after resume'
    history = json.loads((tmp_path / 'killed' / 'results.json').read_text())['history']
    assert [h['epoch'] for h in history] == [1, 2, 3, 4]


def test_ema_numbers_every_update_of_the_run_once_across_epochs_and_phases(tmp_path, data_dir, monkeypatch):
    """timm's EMA decay is 0 at its first steps: a step count that restarts (per epoch or per phase) resets it."""
    from timm.utils import ModelEmaV3
    from dida_timm.training import run
    steps, update = [], ModelEmaV3.update

    def recording_update(self, model, step=None):
        steps.append(step)
        return update(self, model, step=step)

    monkeypatch.setattr(ModelEmaV3, 'update', recording_update)
    args = ['--output', str(tmp_path), '--data-dir', str(data_dir)] + TINY + [
        '--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '2',
        '--ema-decay', '0.9', '--tsne-per-domain', '0', '--select', 'last', '--experiment', 'ema']
    assert run.main(args) == 0
    history = json.loads((tmp_path / 'ema' / 'results.json').read_text())['history']
    assert [h['phase'] for h in history] == ['source_only', 'fixmatch', 'fixmatch']
    assert len(steps) >= 3 and steps == list(range(len(steps))) and len(steps) % 3 == 0


def test_train_refuses_pickled_weights_unless_allowed(tmp_path, data_dir, capsys):
    import timm
    from dida_timm.training import run
    folder = tmp_path / 'pickled'
    timm.models.save_for_hf(timm.create_model('dida_digitnet_compact'), str(folder), safe_serialization=False)
    args = ['--output', str(tmp_path), '--data-dir', str(data_dir), '--model', f'local-dir:{folder}', '--pretrained',
            '--source', 'mnist', '--target', 'uci_digits', '--epochs', '1', '--tsne-per-domain', '0'] + TINY
    assert run.main(args + ['--experiment', 'refused']) == 2
    assert 'no model.safetensors' in capsys.readouterr().err
    assert not (tmp_path / 'refused' / 'results.json').exists()
    assert run.main(args + ['--experiment', 'allowed', '--allow-pickle']) == 0
    assert (tmp_path / 'allowed' / 'results.json').exists()


def test_an_error_while_building_the_run_is_a_message_with_its_traceback_in_the_log(tmp_path, data_dir, monkeypatch,
                                                                                    capsys):
    from dida_timm.training import run

    def broken_build_model(self):
        raise RuntimeError('weights of the wrong shape')

    monkeypatch.setattr(run.Run, '_build_model', broken_build_model)
    args = ['--output', str(tmp_path), '--data-dir', str(data_dir), '--source', 'mnist', '--target', 'uci_digits',
            '--experiment', 'broken'] + TINY
    assert run.main(args) == 2
    assert 'error: RuntimeError: weights of the wrong shape (traceback in' in capsys.readouterr().err
    log = (tmp_path / 'broken' / 'log.txt').read_text()
    assert 'Traceback' in log and 'broken_build_model' in log


def test_a_corrupt_init_checkpoint_is_a_message_naming_the_option_and_the_file(tmp_path, data_dir, capsys):
    from dida_timm.training import run
    args = ['--output', str(tmp_path / 'runs'), '--data-dir', str(data_dir), '--source', 'mnist', '--target',
            'uci_digits'] + TINY
    for name, content in (('truncated.safetensors', b'\x10\x00'), ('empty.pth', b'')):
        (tmp_path / name).write_bytes(content)
        assert run.main(args + ['--init-checkpoint', str(tmp_path / name), '--experiment', name]) == 2
        assert f'error: --init-checkpoint: cannot load {tmp_path / name} into dida_digitnet_compact (' in \
            capsys.readouterr().err


def test_source_and_target_stream_runs_after_a_source_only_phase_in_either_forward_mode(tmp_path, data_dir):
    """The released code's loss variant: source images get a strong view too, also while the phase is source-only."""
    weights = {}
    for forward_mode in ('joint', 'separate'):
        _train(['--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '1',
                '--unlabelled-stream', 'source+target', '--forward-mode', forward_mode, '--tsne-per-domain', '0',
                '--deterministic', '--select', 'last', '--experiment', forward_mode], tmp_path, data_dir)
        history = json.loads((tmp_path / forward_mode / 'results.json').read_text())['history']
        assert [h['phase'] for h in history] == ['source_only', 'fixmatch'] and 'keep_rate' in history[1]
        weights[forward_mode] = _weights(tmp_path / forward_mode)
    # same seed, same data, same source-only phase: only the forward mode can make the adapted weights differ
    assert any(not torch.equal(value, weights['separate'][name]) for name, value in weights['joint'].items()), \
        '--forward-mode had no effect on the trained weights'


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, data_dir):
    _train(['--source', 'mnist', '--target', 'uci_digits', '--epochs', '1', '--experiment', 'warm'],
           tmp_path, data_dir)  # builds the data cache before two processes race for it
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531',
           str(TRAIN), '--output', str(tmp_path), '--data-dir', str(data_dir), '--experiment', 'ddp',
           '--source', 'mnist', 'syn_style', '--target', 'uci_digits', '--epochs', '2', '--device', 'cpu'] + TINY
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    assert results['world_size'] == 2
    # the command a card prints to reproduce it runs (torchrun takes the script, not `python script`)
    assert results['command'].startswith('torchrun --nproc_per_node=2 train/train.py --output ')
    # every target test image is evaluated exactly once across the two ranks
    assert sum(map(sum, results['target_confusion'])) == 200
    assert '2 process(es)' in (tmp_path / 'ddp' / 'log.txt').read_text()


def test_bad_arguments_give_clear_errors(tmp_path, data_dir):
    result = _train(['--target', 'mnist', '--source', 'mnist', 'syn_style', '--experiment', 'x'], tmp_path,
                    data_dir, check=False)
    assert result.returncode != 0 and 'is also a source' in result.stdout + result.stderr
    result = _train(['--dataset', 'pacs', '--source', 'photo', '--target', 'sketch', '--experiment', 'y'],
                    tmp_path, data_dir.parent / 'no_such_dir', check=False, tiny=TINY[len(SIZES):])
    assert result.returncode == 2 and 'pacs root not found' in result.stderr
    result = _train(['--model', 'no_such_model', '--experiment', 'z'], tmp_path, data_dir, check=False)
    assert result.returncode != 0 and 'unknown model' in (result.stdout + result.stderr).lower()
    assert 'Traceback' not in result.stderr
    result = _train(['--init-checkpoint', str(tmp_path / 'none.safetensors'), '--experiment', 'w'], tmp_path,
                    data_dir, check=False)
    assert result.returncode == 2 and f'--init-checkpoint: {tmp_path / "none.safetensors"} is not a file' in \
        result.stderr


def test_dida_model_starts_from_its_static_twins_run(tmp_path, data_dir):
    # the paper's regime on a small scale: a trained static network gets a fresh branch, then adapts
    common = ['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0']
    _train(common + ['--model', 'digitnet_compact', '--method', 'source_only', '--epochs', '1',
                     '--experiment', 'static'], tmp_path, data_dir)
    # lr 0: the weights stay the loaded ones (BN running statistics still move)
    result = _train(common + ['--model', 'dida_digitnet_compact', '--init-checkpoint', str(tmp_path / 'static' /
                              'model.safetensors'), '--epochs', '1', '--lr', '0', '--experiment', 'dida'],
                    tmp_path, data_dir)
    static, dida = _weights(tmp_path / 'static'), _weights(tmp_path / 'dida')
    assert {k for k in dida if not is_branch_parameter(k)} == {k.replace('block3.', 'block3.blocks.') for k in static}
    # with no source-only phase, the label-free reference (a --select candidate) is the static network it came from
    assert 'the static network inside, its branch muted' in result.stdout
    assert 'no source-only phase: the label-free reference' not in result.stdout + result.stderr
    results = json.loads((tmp_path / 'dida' / 'results.json').read_text())
    start = results['history'][0]
    assert start['phase'] == 'static_start' and start['epoch'] == 0
    # ... and the source-only start the run reports (it said n/a: it looked for a source-only phase only)
    assert results['source_only_start_target_accuracy'] == start['target_accuracy'] is not None
    assert start['target_accuracy'] == json.loads((tmp_path / 'static' / 'results.json').read_text())[
        'target_accuracy']
    reference = safetensors.torch.load_file(str(tmp_path / 'dida' / 'selection' / 'reference.safetensors'))
    assert not reference['block3.branch.0.bn.weight'].any() and dida['block3.branch.0.bn.weight'].any()
    for name, value in static.items():
        if 'running' not in name and 'num_batches' not in name:
            assert torch.equal(value, dida[name.replace('block3.', 'block3.blocks.')]), name


@pytest.mark.parametrize('config', sorted((REPO / 'train' / 'configs').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_config_parses_and_names_a_registered_model_and_dataset(config):
    import timm
    from dida_timm.training import options as train
    from dida_timm.data import DATASETS
    args = train.parse_args(['-c', str(config)])
    assert timm.is_model(args.model.split('.')[0]) and args.dataset in DATASETS
    assert args.target not in args.source


@pytest.mark.parametrize('config', sorted((REPO / 'train' / 'configs').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_config_gives_its_guarded_selection_a_trained_reference_or_keeps_the_last_epoch(config):
    # with no source-only phase and no trained classifier, the guard compares every epoch with an untrained start,
    # flags them all and ships that start: six configs did, with the default --select guarded_last
    from dida_timm.training import options as train
    args = train.parse_args(['-c', str(config)])
    assert args.select == 'last' or args.source_only_epochs > 0 or args.init_checkpoint, config.name


def test_config_with_unknown_key_is_refused(tmp_path, capsys):
    from dida_timm.training import options as train
    bad = tmp_path / 'bad.yaml'
    bad.write_text('epochs: 3\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(bad)])
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err


def _flat_unlabelled_folder(folder: Path, data_dir: Path, domain: str, count: int) -> None:
    """The test images of an offline domain as a flat folder of PNGs, with no trace of their labels, plus a
    non-image file and an unreadable image."""
    from dida_timm.data import create_domain_datasets
    ds, = create_domain_datasets('offline_digits', data_dir, [domain], 'test', train_size=320, test_size=200)
    folder.mkdir(parents=True)
    for i in range(count):
        ds.load(i).save(folder / f'img_{i:04d}.png')
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')


def test_sources_with_a_training_split_only_name_the_option_that_picks_their_evaluated_split(tmp_path):
    from PIL import Image
    root = tmp_path / 'data'
    for domain in ('A', 'B'):
        for label in ('0', '1'):
            (root / domain / 'Train' / label).mkdir(parents=True)
            Image.new('RGB', (8, 8)).save(root / domain / 'Train' / label / 'x.png')
    (tmp_path / 'target').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'target' / 'y.png')
    result = _train(['--dataset', 'folder', '--target-dir', str(tmp_path / 'target'), '--epochs', '1'], tmp_path,
                    root, check=False, tiny=['--no-progress'])
    # the user asked for no test split: the message said which split was missing, not which option asks for it
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert "split 'test' of domain 'A' not found" in result.stderr and \
        "evaluated on --target-test-split 'test': name a split they have" in result.stderr


def test_a_target_folder_inside_a_source_domain_or_a_single_class_is_refused_before_training(tmp_path):
    from PIL import Image
    root = tmp_path / 'data'
    for domain in ('A', 'B', 'C'):
        for label in ('0', '1'):
            for i in range(3):
                (root / domain / label).mkdir(parents=True, exist_ok=True)
                colour = (40 * i, 60 * 'ABC'.index(domain), 100 * int(label))  # no two alike: copies are shared images
                Image.new('RGB', (8, 8), colour).save(root / domain / label / f'{domain}{label}{i}.png')
    unlabelled = tmp_path / 'C_photos'
    unlabelled.mkdir()
    Image.new('RGB', (8, 8), (1, 2, 3)).save(unlabelled / 'x.png')
    common = ['--dataset', 'folder', '--source-only-epochs', '1', '--epochs', '1', '--batch-size', '2']
    # the labelled evaluation folder is domain C, which every domain of --data-dir being a source makes a source
    result = _train(common + ['--target-dir', str(unlabelled), '--target-eval-dir', str(root / 'C')], tmp_path,
                    root, check=False, tiny=['--no-progress'])
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert re.search(r"--target-eval-dir: .*C0\d\.png is also an image of the labelled source domain 'C'",
                     result.stderr), result.stderr
    # the unlabelled target itself inside source B (through a link, as it may be)
    (tmp_path / 'B_link').symlink_to(root / 'B' / '1')
    result = _train(common + ['--target-dir', str(tmp_path / 'B_link'), '--source', 'A', 'B'], tmp_path, root,
                    check=False, tiny=['--no-progress'])
    assert result.returncode == 2 and "--target-dir: " in result.stderr and "source domain 'B'" in result.stderr
    # under other names: a link to one of B's images, then a copy of it (a folder anonymised to hide its labels)
    renamed = tmp_path / 'renamed'
    renamed.mkdir()
    Image.new('RGB', (8, 8), (9, 9, 9)).save(renamed / 'own.png')
    (renamed / 'img_001.png').symlink_to(root / 'B' / '1' / 'B11.png')
    for _ in ('link', 'copy'):
        result = _train(common + ['--target-dir', str(renamed), '--source', 'A', 'B'], tmp_path, root, check=False,
                        tiny=['--no-progress'])
        assert result.returncode == 2 and re.search(r"--target-dir: .*B11\.png is also an image of the labelled "
                                                    r"source domain 'B'", result.stderr), result.stderr
        (renamed / 'img_001.png').unlink()
        shutil.copy(root / 'B' / '1' / 'B11.png', renamed / 'img_001.png')
    # one class: its softmax is always 1, so every accuracy would read 100%
    for domain in ('A', 'B', 'C'):
        shutil.rmtree(root / domain / '1')
    result = _train(common + ['--target-dir', str(unlabelled)], tmp_path, root, check=False, tiny=['--no-progress'])
    assert result.returncode == 2 and "have one class, ['0']: a classifier needs two or more" in result.stderr


def test_too_small_data_is_refused_before_training_naming_the_folder_and_the_held_out_images(tmp_path):
    from PIL import Image
    root = tmp_path / 'data'
    for domain, count in (('A', 9), ('B', 3)):
        for label in ('0', '1'):
            (root / domain / label).mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (8, 8), (20 * i, 0, 0)).save(root / domain / label / f'{i}.png')
    broken = tmp_path / 'broken'
    broken.mkdir()
    for i in range(3):
        (broken / f'{i}.png').write_bytes(b'not a png')
    common = ['--dataset', 'folder', '--source', 'A', '--source-only-epochs', '1', '--epochs', '1']
    # 18 images in A, 2 held out: the 16 left cannot fill a batch of 17 (the sampler counted 16 without saying why)
    result = _train(common + ['--target', 'B', '--batch-size', '17', '--experiment', 'run'], tmp_path, root,
                    check=False, tiny=['--no-progress'])
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert "source domain 'A' has 18 images, 2 of them held out (--source-val-fraction 0.1): its 16 training " \
        'images cannot fill one batch of --batch-size 17' in result.stderr, result.stderr
    # the corrected command may take the name again: the failed start left only its log and empty folders
    _train(common + ['--target', 'B', '--batch-size', '4', '--experiment', 'run'], tmp_path, root,
           tiny=['--no-progress', '--tsne-per-domain', '0'])
    result = _train(common + ['--target', 'B', '--batch-size', '4', '--experiment', 'run'], tmp_path, root,
                    check=False, tiny=['--no-progress'])
    assert result.returncode == 2 and 'already holds a run' in result.stderr
    result = _train(common + ['--target-dir', str(broken), '--batch-size', '2'], tmp_path, root, check=False,
                    tiny=['--no-progress'])
    assert result.returncode == 2 and f'--target-dir {broken}: none of its 3 images can be read' in result.stderr


@pytest.mark.slow
def test_an_unreadable_image_of_the_evaluation_folder_is_left_out_with_a_warning_before_training(tmp_path, data_dir):
    from dida_timm.data import create_domain_datasets
    target = tmp_path / 'new_domain'
    _flat_unlabelled_folder(target, data_dir, 'mnistm_style', 40)
    ds, = create_domain_datasets('offline_digits', data_dir, ['mnistm_style'], 'test', train_size=320, test_size=200)
    evaluation = tmp_path / 'labelled'
    for i in range(30):
        (evaluation / ds.classes[ds.targets[i]]).mkdir(parents=True, exist_ok=True)
        ds.load(i).save(evaluation / ds.classes[ds.targets[i]] / f'{i}.png')
    (evaluation / ds.classes[0] / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    _train(['--source', 'mnist', '--target-dir', str(target), '--target-eval-dir', str(evaluation),
            '--source-only-epochs', '1', '--epochs', '1', '--experiment', 'eval'], tmp_path, data_dir)
    log = (tmp_path / 'eval' / 'log.txt').read_text()
    assert 'skipping unreadable evaluation image' in log and 'broken.png' in log
    assert '1 unreadable images left out, target accuracy is measured on the other 30' in log
    # the target folder's files without an image extension are named by suffix, as a source domain's are (a .tif or
    # .webp target was thinned out with a count only)
    assert "domain new_domain (train): 1 files left out, not having an image extension" in log and \
        "suffixes ['.txt']" in log
    results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
    assert results['data_images']['test']['new_domain'] == 30 and results['target_accuracy'] is not None


@pytest.mark.slow
def test_a_flat_folder_of_unlabelled_images_trains_exports_and_predicts_without_labels(tmp_path, data_dir):
    from dida_timm.data import create_domain_datasets
    from dida_timm.hub import export_runs
    target = tmp_path / 'new_domain'
    _flat_unlabelled_folder(target, data_dir, 'mnistm_style', 120)
    result = _train(['--source', 'mnist', 'syn_style', '--target-dir', str(target), '--source-only-epochs', '1',
                     '--epochs', '2', '--experiment', 'flat'], tmp_path, data_dir)
    run = tmp_path / 'flat'
    results = json.loads((run / 'results.json').read_text())
    assert results['target'] == 'new_domain' and not results['target_labelled'] and results['transductive'] is False
    assert results['target_accuracy'] is None and results['target_confusion'] is None
    assert set(results['per_domain_accuracy']) == {'mnist', 'syn_style'}
    assert all('target_accuracy' not in h for h in results['history'])
    assert 0 <= results['estimated_target_accuracy'] <= 100
    assert 0 <= results['cot_estimated_target_accuracy'] <= 100
    # COT's label marginal: every source label of the two balanced source domains
    share = results['label_free']['label_share']
    sources = create_domain_datasets('offline_digits', data_dir, ['mnist', 'syn_style'], 'train', train_size=320,
                                     test_size=200)
    labels = np.concatenate([ds.targets for ds in sources])
    assert share == pytest.approx((np.bincount(labels, minlength=10) / len(labels)).tolist())
    assert results['selection']['rule'] == 'guarded_last'
    assert results['label_free']['target_held_out_images'] == 24  # 20% of the 120 readable images
    log = (run / 'log.txt').read_text()
    assert 'broken.png' in log and '1 non-image files skipped, 1 unreadable images skipped' in log
    assert 'no target labels: accuracy unknown' in result.stdout
    assert not (run / 'confusion_matrix.png').exists() and (run / 'tsne.png').exists()
    assert len(list((run / 'label_free').glob('epoch-*.npz'))) == 3

    repo = export_runs([run], tmp_path / 'repo', 'dida-timm/flat-test')
    predictions = tmp_path / 'predictions.csv'
    predicted = subprocess.run([sys.executable, '-m', 'dida_timm.inference', '--model', str(repo), '--images',
                                str(target), '--output', str(predictions)], cwd=REPO, capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert 'estimated accuracy' in predicted.stdout
    exported = json.loads((repo / 'config.json').read_text())['label_free']
    assert exported['label_share'] == share and exported['temperature'] == results['label_free']['temperature']
    assert 'estimated accuracy by COT' in predicted.stdout
    assert len(predictions.read_text().splitlines()) == 1 + 120


def test_a_run_is_transductive_when_its_target_evaluates_images_it_trained_on(tmp_path):
    # by split name alone, a dataset without splits (Office-Home's original release, a class-folder domain, which
    # read the same folder for 'train' and 'test') was recorded as not transductive, and its card said so
    from dida_timm.data import ArrayDomainDataset, FileDomainDataset
    from dida_timm.training.run import _shares_images
    files = [(tmp_path / f'{i}.png', 0) for i in range(4)]
    for i, (path, _) in enumerate(files):
        path.write_bytes(bytes([i]) * 8)
    (tmp_path / 'x').mkdir()
    domain = lambda samples: FileDomainDataset('d', ['a'], samples)  # noqa: E731
    assert _shares_images(domain(files[:3]), domain([(tmp_path / 'x' / '..' / '2.png', 0)]), same_split=False)
    assert not _shares_images(domain(files[:2]), domain(files[2:]), same_split=True)
    # a labelled folder of copies (the usual way to label a few of one's own images): by content, where asked
    (tmp_path / 'x' / 'labelled.png').write_bytes((tmp_path / '1.png').read_bytes())
    copy = domain([(tmp_path / 'x' / 'labelled.png', 0)])
    assert _shares_images(domain(files), copy, same_split=False, by_content=True)
    assert not _shares_images(domain(files), copy, same_split=False)
    assert not _shares_images(domain(files[2:]), copy, same_split=False, by_content=True)
    assert not _shares_images(domain(files), None, same_split=True)  # an unlabelled target: nothing evaluated
    arrays = ArrayDomainDataset('d', ['a'], np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    assert _shares_images(arrays, arrays, same_split=True) and not _shares_images(arrays, arrays, same_split=False)


@pytest.mark.slow
def test_a_run_forced_to_collapse_falls_back_to_the_source_only_model_with_a_warning(tmp_path, data_dir):
    # every pseudo-label is corrupted to class 0 and kept: the adapted model collapses onto one class
    script = tmp_path / 'collapse.py'
    script.write_text(
        'import sys, runpy, torch\n'
        'import dida_timm.training.step as step\n'
        'from dida_timm.training.fixmatch import PseudoLabels\n'
        'def corrupted(logits, threshold=0.95, soft=False):\n'
        '    n = len(logits)\n'
        '    return PseudoLabels(torch.zeros(n, dtype=torch.long), torch.ones(n), torch.ones(n))\n'
        'step.pseudo_label = corrupted\n'
        f'sys.argv = [{str(TRAIN)!r}] + sys.argv[1:]\n'
        f'runpy.run_path({str(TRAIN)!r}, run_name="__main__")\n')
    cmd = [sys.executable, str(script), '--output', str(tmp_path), '--data-dir', str(data_dir)] + TINY + [
        '--source', 'mnist', '--target', 'syn_style', '--source-only-epochs', '2', '--epochs', '2',
        '--unlabelled-weight', '3', '--tsne-per-domain', '0', '--experiment', 'collapse']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / 'collapse' / 'results.json').read_text())
    selection = results['selection']
    assert selection['guard_fired'] and selection['epoch'] == 2, selection
    assert 'falling back to the source-only model' in selection['reason']
    assert results['target_accuracy'] == pytest.approx(results['source_only_start_target_accuracy'])
    assert results['history'][-1]['effective_classes'] < 2
    # COT charges the collapse: one class can absorb about a tenth of the images at no cost
    assert results['history'][-1]['cot_estimated_accuracy'] < 25
    assert 'collapse guard fired' in (tmp_path / 'collapse' / 'log.txt').read_text()
    assert 'WARNING: the collapse guard fired: it flagged the last epoch (flagged epochs [3, 4])' in result.stdout
    # the shipped weights are the source-only model's
    reference = safetensors.torch.load_file(str(tmp_path / 'collapse' / 'selection' / 'reference.safetensors'))
    assert all(torch.equal(v, _weights(tmp_path / 'collapse')[k]) for k, v in reference.items())

@pytest.mark.slow
def test_run_finishes_without_the_plotting_packages(tmp_path, data_dir):
    # the core install has no matplotlib / scikit-learn (the [data] extra has them): stubs that fail to import
    hidden = tmp_path / 'hidden'
    for package in ('matplotlib', 'sklearn'):
        (hidden / package).mkdir(parents=True)
        (hidden / package / '__init__.py').write_text(f"raise ImportError('{package} hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get('PYTHONPATH', '')]))
    args = ['--source', 'mnist', '--target', 'uci_digits', '--method', 'source_only', '--epochs', '1']
    # the offline benchmark itself is built from [data] packages: build its cache first
    _train(args + ['--experiment', 'warm', '--tsne-per-domain', '0'], tmp_path, data_dir)
    cmd = [sys.executable, str(TRAIN), '--output', str(tmp_path), '--data-dir', str(data_dir)] + TINY + args + [
        '--experiment', 'core']
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / 'core' / 'results.json').is_file() and not list((tmp_path / 'core').glob('*.png'))
    assert 'report pictures skipped: matplotlib and scikit-learn not installed' in result.stdout

@pytest.mark.slow
def test_a_generic_timm_cnn_adapts_from_its_static_twin_and_exports(tmp_path, data_dir):
    # dida_regnety_004 (add_dida on timm's RegNetY, untrained) through the unchanged train.py and hub export
    import timm
    from dida_timm.hub import export_runs
    from dida_timm.inference import load_model
    twin = timm.create_model('regnety_004', num_classes=10)
    twin_path = tmp_path / 'regnety_004.safetensors'
    safetensors.torch.save_file(twin.state_dict(), str(twin_path))
    _train(['--model', 'dida_regnety_004.untrained', '--input-size', '32', '--init-checkpoint', str(twin_path),
            '--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '1',
            '--tsne-per-domain', '0', '--experiment', 'regnet'], tmp_path, data_dir)
    run = tmp_path / 'regnet'
    results = json.loads((run / 'results.json').read_text())
    assert [h['phase'] for h in results['history']] == ['source_only', 'fixmatch']
    weights = _weights(run)
    assert {k for k in weights if '.branch.' not in k} == {k.replace('s4.', 's4.blocks.', 1) for k in twin.state_dict()}
    assert any(k.startswith('s4.branch.0.dida.') for k in weights)
    exported = export_runs([run], tmp_path / 'export', 'dida-timm/regnet-test')
    model = load_model(f'local-dir:{exported}')
    reference = timm.create_model('dida_regnety_004', num_classes=10)
    reference.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_run_killed_between_a_checkpoint_and_its_selection_finishes_on_resume(tmp_path, data_dir):
    # the kept weights are written after each checkpoint; killed in between, the resumed run kept epoch 2's while
    # its rule picked 3, and finish() refused such a pair ('the selected epoch is 3 but ... keeps epoch 2') as soon
    # as a later epoch was flagged: a resume keeps the checkpoint's weights where the rule picks them
    common = ['--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '2',
              '--select', 'last', '--tsne-per-domain', '0', '--experiment', 'run']
    _train(common, tmp_path, data_dir)
    run = tmp_path / 'run'
    weights = _weights(run)
    for name in ('results.json', 'model.safetensors'):
        (run / name).unlink()
    shutil.copy(run / 'checkpoints' / 'epoch-0002' / 'model.safetensors', run / 'selection' / 'selected.safetensors')
    (run / 'selection' / 'selected.json').write_text(json.dumps(dict(epoch=2)))
    result = _train(common + ['--resume'], tmp_path, data_dir)
    assert 'after epoch 3' in result.stdout
    assert json.loads((run / 'results.json').read_text())['selection']['epoch'] == 3
    assert json.loads((run / 'selection' / 'selected.json').read_text())['epoch'] == 3
    kept = safetensors.torch.load_file(str(run / 'selection' / 'selected.safetensors'))
    for name, value in weights.items():
        assert torch.equal(value, _weights(run)[name]), f'{name} differs from the run before the kill'
        assert torch.equal(value, kept[name]), f'{name} of the kept weights is not the checkpoint\'s'


def test_run_killed_after_its_last_checkpoint_finishes_on_resume(tmp_path, data_dir):
    """Killed between the last epoch's checkpoint and the results: --resume trains nothing and reports as planned."""
    common = ['--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '2',
              '--tsne-per-domain', '0', '--experiment', 'run']
    _train(common, tmp_path, data_dir)
    run = tmp_path / 'run'
    before = json.loads((run / 'results.json').read_text())
    weights = _weights(run)
    for name in ('results.json', 'model.safetensors'):
        (run / name).unlink()
    result = _train(common + ['--resume'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout and 'after epoch 3' in result.stdout
    after = json.loads((run / 'results.json').read_text())
    assert after['selection'] == before['selection'] and after['history'] == before['history']
    assert after['target_accuracy'] == before['target_accuracy']
    for name, value in weights.items():
        assert torch.equal(value, _weights(run)[name]), f'{name} differs from the run before the kill'


def test_adapting_without_a_source_only_phase_warns_that_the_guard_reference_is_the_loaded_model(tmp_path, data_dir):
    common = ['--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '0', '--epochs', '1',
              '--tsne-per-domain', '0']
    guarded = _train(common + ['--experiment', 'guarded'], tmp_path, data_dir)
    assert 'no source-only phase: the label-free reference' in guarded.stdout + guarded.stderr
    last = _train(common + ['--select', 'last', '--experiment', 'last'], tmp_path, data_dir)
    assert 'no source-only phase' not in last.stdout + last.stderr


def test_runs_named_by_the_same_second_get_folders_of_their_own(tmp_path):
    from dida_timm.training.run import claim_run_folder
    # two seeds started side by side without --experiment wrote into one folder, each result overwriting the other's
    names = [claim_run_folder(tmp_path / 'out', '20261204-120000-dida_digitnet_compact-mnist-fixmatch')
             for _ in range(3)]
    assert names == ['20261204-120000-dida_digitnet_compact-mnist-fixmatch',
                     '20261204-120000-dida_digitnet_compact-mnist-fixmatch-2',
                     '20261204-120000-dida_digitnet_compact-mnist-fixmatch-3']
    assert all((tmp_path / 'out' / n).is_dir() for n in names)


def test_a_run_killed_while_finishing_does_not_pass_for_finished(tmp_path, data_dir, monkeypatch):
    # results.json tells a finished run (bench/uda_runs.py skips it, hub/export.py exports it): it comes last
    import dida_timm.training.run as run_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing the report')

    monkeypatch.setattr(run_module, 'write_report', killed)
    argv = ['--output', str(tmp_path), '--data-dir', str(data_dir), *TINY, '--source', 'mnist', '--target',
            'uci_digits', '--tsne-per-domain', '0', '--epochs', '1', '--experiment', 'run']
    with pytest.raises(KeyboardInterrupt):
        run_module.main(argv)
    run = tmp_path / 'run'
    assert (run / 'model.safetensors').is_file() and not (run / 'results.json').exists()
    assert not list(run.glob('.*.tmp'))
    monkeypatch.undo()
    assert run_module.main(argv + ['--resume']) == 0  # and main let go of the run folder's lock
    assert json.loads((run / 'results.json').read_text())['epochs'] == 1


def test_soft_weighting_logs_every_pseudo_label_as_kept(tmp_path, data_dir):
    # it trains on all of them, weighted by confidence: a keep share at --threshold described another recipe
    _train(['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0', '--epochs', '1',
            '--soft-weighting', '--experiment', 'soft'], tmp_path, data_dir)
    last = json.loads((tmp_path / 'soft' / 'results.json').read_text())['history'][-1]
    assert last['phase'] == 'fixmatch' and last['pseudo_keep_share'] == 1.0 and last['keep_rate'] == 1.0


def test_a_loaded_classifier_answers_the_datas_classes_in_their_order(caplog):
    import timm

    from dida_timm.training.run import head_for_classes
    torch.manual_seed(0)
    model = timm.create_model('digitnet_compact', num_classes=3).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=['b', 'c', 'a'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert head_for_classes(model, ['a', 'b', 'c'])  # the same names in another order: the rows follow them
    with torch.no_grad():
        torch.testing.assert_close(model(x), before[:, [2, 0, 1]])
    assert model.pretrained_cfg['label_names'] == ['a', 'b', 'c'] and head_for_classes(model, ['a', 'b', 'c'])
    model.pretrained_cfg['label_names'] = {'0': 'c', '1': 'a', '2': 'b'}  # timm's id -> name map
    with torch.no_grad():
        before = model(x)
    assert head_for_classes(model, ['a', 'b', 'c'])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before[:, [1, 2, 0]])
    # other names (a digits checkpoint fine-tuned on folders named zero..two): its rows meant other classes
    weight = model.get_classifier().weight.detach().clone()
    assert not head_for_classes(model, ['one', 'two', 'zero'])
    assert not torch.equal(model.get_classifier().weight, weight)
    assert "classify ['a', 'b', 'c'], not the data's classes ['one', 'two', 'zero']" in caplog.text


def test_the_run_folder_lock_is_not_held_by_forked_children_or_where_locks_do_not_work(tmp_path, monkeypatch, caplog):
    # a killed run's loader workers live on for seconds: holding its lock, they refused the resume the README gives
    import errno
    import fcntl
    import multiprocessing

    from dida_timm.training.run import RunError, hold_run_folder
    lock = hold_run_folder(tmp_path / 'run')
    child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(30,))
    child.start()
    try:
        lock.close()  # the run is gone, its forked worker not yet
        probe = subprocess.run([sys.executable, '-c', 'import sys; from pathlib import Path; '
                                'from dida_timm.training.run import hold_run_folder; '
                                'hold_run_folder(Path(sys.argv[1]))', str(tmp_path / 'run')],
                               capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr
    finally:
        child.kill()
        child.join()
    # a file system without POSIX locks: a warning, and the run goes on unlocked
    def unsupported(*args):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(fcntl, 'lockf', unsupported)
    assert hold_run_folder(tmp_path / 'other') is None and 'cannot be locked (No locks available)' in caplog.text
    monkeypatch.setattr(fcntl, 'lockf', lambda *args: (_ for _ in ()).throw(OSError(errno.EAGAIN, 'busy')))
    with pytest.raises(RunError, match='is in use by another train.py process'):
        hold_run_folder(tmp_path / 'other')
