"""End-to-end runs of train/train.py on small offline data: adaptation helps, resume is exact, DDP works."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'train' / 'train.py'
TINY = ['--offline-train-size', '320', '--offline-test-size', '200', '--batch-size', '16', '--no-progress',
        '--tsne-per-domain', '60']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A cache folder for the small offline benchmark, shared by the runs of this module."""
    return tmp_path_factory.mktemp('offline_cache')


def _train(args, out: Path, data_dir: Path, check=True, **popen):
    cmd = [sys.executable, str(TRAIN), '--output', str(out), '--data-dir', str(data_dir)] + TINY + args
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
    start, final = results['source_only_start_target_accuracy'], results['target_accuracy']
    assert final > start + 3, f'adaptation did not help: {start:.1f} -> {final:.1f}\n{result.stdout[-2000:]}'
    assert '| source-only start | adapted (fixmatch) |' in result.stdout
    for picture in ('confusion_matrix.png', 'tsne.png', 'curves.png'):
        assert (tmp_path / 'adapt' / picture).stat().st_size > 10_000
    assert set(results['per_domain_accuracy']) == {'mnist', 'mnistm_style'}
    assert len(results['history']) == 8 and results['history'][-1]['phase'] == 'fixmatch'


def _weights(folder: Path):
    return safetensors.torch.load_file(str(folder / 'model.safetensors'))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, data_dir):
    common = ['--source', 'mnist', 'uci_digits', '--target', 'syn_style', '--source-only-epochs', '1',
              '--epochs', '3', '--deterministic', '--tsne-per-domain', '0']
    _train(common + ['--experiment', 'straight'], tmp_path, data_dir)
    proc = _train(common + ['--experiment', 'killed'], tmp_path, data_dir, start_new_session=True)
    last = tmp_path / 'killed' / 'checkpoints' / 'last'
    deadline = time.time() + 300
    while not (last.exists() and last.read_text().strip() == 'epoch-0002') and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: epoch 3 of 4 is under way
    proc.wait()
    assert not (tmp_path / 'killed' / 'results.json').exists()
    result = _train(common + ['--experiment', 'killed', '--resume'], tmp_path, data_dir)
    assert 'resumed from' in result.stdout
    straight, resumed = _weights(tmp_path / 'straight'), _weights(tmp_path / 'killed')
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), f'{name} differs after resume'
    history = json.loads((tmp_path / 'killed' / 'results.json').read_text())['history']
    assert [h['epoch'] for h in history] == [1, 2, 3, 4]


@pytest.mark.parametrize('forward_mode', ['joint', 'separate'])
def test_source_and_target_stream_runs_after_a_source_only_phase(tmp_path, data_dir, forward_mode):
    """The released code's loss variant: source images get a strong view too, also while the phase is source-only."""
    _train(['--source', 'mnist', '--target', 'uci_digits', '--source-only-epochs', '1', '--epochs', '1',
            '--unlabelled-stream', 'source+target', '--forward-mode', forward_mode, '--tsne-per-domain', '0',
            '--experiment', 'stream'], tmp_path, data_dir)
    history = json.loads((tmp_path / 'stream' / 'results.json').read_text())['history']
    assert [h['phase'] for h in history] == ['source_only', 'fixmatch'] and 'keep_rate' in history[1]


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
    # every target test image is evaluated exactly once across the two ranks
    assert sum(map(sum, results['target_confusion'])) == 200
    assert '2 process(es)' in (tmp_path / 'ddp' / 'log.txt').read_text()


def test_bad_arguments_give_clear_errors(tmp_path, data_dir):
    result = _train(['--target', 'mnist', '--source', 'mnist', 'syn_style', '--experiment', 'x'], tmp_path,
                    data_dir, check=False)
    assert result.returncode != 0 and 'is also a source' in result.stdout + result.stderr
    result = _train(['--dataset', 'pacs', '--source', 'photo', '--target', 'sketch', '--experiment', 'y'],
                    tmp_path, data_dir.parent / 'no_such_dir', check=False)
    assert result.returncode == 2 and 'pacs root not found' in result.stderr
    result = _train(['--model', 'no_such_model', '--experiment', 'z'], tmp_path, data_dir, check=False)
    assert result.returncode != 0 and 'unknown model' in (result.stdout + result.stderr).lower()
    assert 'Traceback' not in result.stderr
    result = _train(['--init-checkpoint', str(tmp_path / 'none.safetensors'), '--experiment', 'w'], tmp_path,
                    data_dir, check=False)
    assert result.returncode != 0 and f'--init-checkpoint {tmp_path / "none.safetensors"} is not a file' in \
        result.stdout + result.stderr


def test_dida_model_starts_from_its_static_twins_run(tmp_path, data_dir):
    # the paper's regime on a small scale: a trained static network gets a fresh branch, then adapts
    common = ['--source', 'mnist', '--target', 'uci_digits', '--tsne-per-domain', '0']
    _train(common + ['--model', 'digitnet_compact', '--method', 'source_only', '--epochs', '1',
                     '--experiment', 'static'], tmp_path, data_dir)
    # lr 0: the weights stay the loaded ones (BN running statistics still move)
    _train(common + ['--model', 'dida_digitnet_compact', '--init-checkpoint', str(tmp_path / 'static' /
                     'model.safetensors'), '--epochs', '1', '--lr', '0', '--experiment', 'dida'], tmp_path, data_dir)
    static, dida = _weights(tmp_path / 'static'), _weights(tmp_path / 'dida')
    assert {k for k in dida if '.branch.' not in k} == {k.replace('block3.', 'block3.blocks.') for k in static}
    for name, value in static.items():
        if 'running' not in name and 'num_batches' not in name:
            assert torch.equal(value, dida[name.replace('block3.', 'block3.blocks.')]), name


@pytest.mark.parametrize('config', sorted((REPO / 'train' / 'configs').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_config_parses_and_names_a_registered_model_and_dataset(config):
    import timm
    sys.path.insert(0, str(REPO / 'train'))
    import train
    from dida_timm.data import DATASETS
    args = train.parse_args(['-c', str(config)])
    assert timm.is_model(args.model.split('.')[0]) and args.dataset in DATASETS
    assert args.target not in args.source


def test_config_with_unknown_key_is_refused(tmp_path, capsys):
    sys.path.insert(0, str(REPO / 'train'))
    import train
    bad = tmp_path / 'bad.yaml'
    bad.write_text('epochs: 3\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(bad)])
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err


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
