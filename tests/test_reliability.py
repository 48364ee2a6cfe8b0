"""Failure is boring: crashes lose nothing, bad numbers and bad configs are refused, pickles cannot run code."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
from PIL import Image

from dida_timm.data import read_class_folders
from dida_timm.hub import validate_hub_config
from dida_timm.training import NonFiniteLossError, UdaConfig, load_last_checkpoint, save_checkpoint, train_one_epoch
from dida_timm.training.distributed import broadcast_from_main
from dida_timm.training.loop import MultiViewModel

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'train' / 'train.py'
TINY = ['--offline-train-size', '160', '--offline-test-size', '100', '--batch-size', '8', '--no-progress',
        '--tsne-per-domain', '0', '--source', 'mnist', 'uci_digits', '--target', 'syn_style']


def _train(args, out, check=True):
    result = subprocess.run([sys.executable, str(TRAIN), '--output', str(out), '--data-dir', str(out / 'cache')]
                            + TINY + args, cwd=REPO, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class _Boom(Exception):
    pass


def test_checkpoint_interrupted_while_writing_is_never_picked_up(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, model, dict(history=[1]))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1)

    def dies_mid_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b'half a checkpoint')
        raise _Boom('killed while writing')

    monkeypatch.setattr(torch, 'save', dies_mid_write)
    with pytest.raises(_Boom):
        save_checkpoint(tmp_path, 2, model, dict(history=[1, 2]))
    monkeypatch.undo()
    # written aside and renamed into place: no epoch-0002 with half a checkpoint for a later pruning or listing
    assert sorted(p.name for p in tmp_path.glob('epoch-*')) == ['epoch-0001']
    fresh = nn.Linear(3, 2)
    state = load_last_checkpoint(tmp_path, fresh)
    assert state['epoch'] == 1 and state['history'] == [1]
    for k, v in good.items():
        assert torch.equal(fresh.state_dict()[k], v)
    save_checkpoint(tmp_path, 2, model, dict(history=[1, 2]))  # the next save clears what the killed one left
    assert not list(tmp_path.glob('.tmp-*')) and load_last_checkpoint(tmp_path, fresh)['epoch'] == 2


def test_non_finite_loss_raises_naming_the_step():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            return out * float('nan') if x[0, 0] > 100 else out

    model = MultiViewModel(Exploding())
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    batches[2][0][0, 0] = 1000.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match='epoch 5, step 2'):
        train_one_epoch(model, UdaConfig(method='source_only'), batches, None, opt, epoch=4)


def test_weights_an_update_made_non_finite_stop_the_epoch_before_they_are_used():
    # the loss is finite at every step; the last step's update overflows the weights to inf (an lr of 1e37)
    model = MultiViewModel(nn.Linear(4, 3))
    batches = [(torch.randn(2, 4) * 1e3, torch.tensor([0, 1]))]  # one step: its loss is the initial weights'
    opt = torch.optim.SGD(model.parameters(), lr=1e37)
    with pytest.raises(NonFiniteLossError, match='the weights are not finite after epoch 3, though its losses were'):
        train_one_epoch(model, UdaConfig(method='source_only'), batches, None, opt, epoch=2)
    model = MultiViewModel(nn.Linear(4, 3))  # a sane lr passes
    train_one_epoch(model, UdaConfig(method='source_only'), batches, None,
                    torch.optim.SGD(model.parameters(), lr=0.1), epoch=2)


@pytest.mark.slow
def test_nan_during_training_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # the source-only epoch is fine; an unlabelled-loss weight beyond float32 (inf itself is refused as an
    # argument) makes the first adaptation step NaN
    result = _train(['--experiment', 'run', '--source-only-epochs', '1', '--epochs', '1',
                     '--unlabelled-weight', '1e300'], tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert 'loss is nan at epoch 2, step 0' in output
    ckpt = tmp_path / 'run' / 'checkpoints'
    assert (ckpt / 'last').read_text().strip() == 'epoch-0001' and not (ckpt / 'epoch-0002').exists()
    assert not (tmp_path / 'run' / 'results.json').exists()
    weights = safetensors.torch.load_file(str(ckpt / 'epoch-0001' / 'model.safetensors'))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/dida_timm_pwned',))


def test_malicious_pickles_are_refused(tmp_path):
    marker = Path('/tmp/dida_timm_pwned')
    marker.unlink(missing_ok=True)
    # a training state file
    save_checkpoint(tmp_path / 'ckpt', 1, nn.Linear(2, 2), dict(history=[]))
    state_file = tmp_path / 'ckpt' / 'epoch-0001' / 'state.pt'
    state_file.write_bytes(pickle.dumps({'epoch': 1, 'evil': _Payload()}))
    with pytest.raises(OSError, match=f'cannot resume from {state_file}') as refused:
        load_last_checkpoint(tmp_path / 'ckpt', nn.Linear(2, 2))
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    # a state file damaged in its first bytes is no torch file: named too, not a UnicodeDecodeError
    save_checkpoint(tmp_path / 'damaged', 1, nn.Linear(2, 2), dict(history=[]))
    state_file = tmp_path / 'damaged' / 'epoch-0001' / 'state.pt'
    state_file.write_bytes(b'XX' + state_file.read_bytes()[2:])
    with pytest.raises(OSError, match=f'cannot resume from {state_file}'):
        load_last_checkpoint(tmp_path / 'damaged', nn.Linear(2, 2))
    # pretrained weights given as a pickle file
    evil = tmp_path / 'weights.pth'
    evil.write_bytes(pickle.dumps({'conv1.weight': _Payload()}))
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        timm.create_model('dida_digitnet_compact', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not marker.exists()


@pytest.mark.parametrize('change, field', [
    (dict(architecture='dida_resnet18; rm -rf /'), 'architecture'),
    (dict(num_classes=-3), 'num_classes'),
    (dict(num_classes=10 ** 9), 'num_classes'),
    (dict(model_args={'pretrained_cfg_overlay': {'file': '/etc/passwd'}}), 'model_args.pretrained_cfg_overlay'),
    (dict(model_args={'dida_reduction': float('inf')}), 'model_args.dida_reduction'),
    (dict(pretrained_cfg={'file': '/somewhere/else.pth'}), 'pretrained_cfg.file'),
    (dict(pretrained_cfg={'custom_load': True}), 'pretrained_cfg.custom_load'),
    (dict(label_names=[1, 2]), 'label_names'),
    (dict(label_names=[str(i) for i in range(9)]), 'label_names'),  # 9 names for 10 classes
    (dict(label_names={str(i + 1): str(i) for i in range(10)}), 'label_names'),  # ids 1 to 10, not 0 to 9
])
def test_hub_config_values_are_validated_before_use(change, field):
    config = dict(architecture='dida_digitnet_compact', num_classes=10, model_args={}, pretrained_cfg={})
    validate_hub_config(config, 'ok')
    validate_hub_config(dict(config, label_names={str(i): f'class {i}' for i in range(10)}), 'ok')
    with pytest.raises(ValueError, match=f"field '{field}'"):
        validate_hub_config(dict(config, **change), 'hf-hub:org/evil')


def test_label_names_given_as_an_id_to_name_map_name_each_class_by_its_id():
    from dida_timm.inference import label_names
    model = timm.create_model('dida_digitnet_compact', num_classes=3)
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names={'2': 'two', '0': 'zero', '1': 'one'})
    assert label_names(model) == ['zero', 'one', 'two']
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=['zero', 'one'])
    with pytest.raises(ValueError, match="label_names .* do not name its 3 classes"):
        label_names(model)


def test_bad_images_are_handled_or_named(tmp_path):
    root = tmp_path / 'dom'
    (root / 'cat').mkdir(parents=True)
    Image.new('RGB', (3, 2), (9, 9, 9)).save(root / 'cat' / 'tiny.png')  # smaller than any input size
    (root / 'cat' / 'empty.png').write_bytes(b'')
    ds = read_class_folders(root, 'dom')
    from dida_timm.data import create_uda_transforms
    ds.transform = create_uda_transforms(32, (0.5,) * 3, (0.5,) * 3)['test']
    names = [p.name for p in ds.paths]
    assert ds[names.index('tiny.png')][0].shape == (3, 32, 32)
    with pytest.raises(OSError, match='empty.png'):
        ds[names.index('empty.png')]


@pytest.mark.slow
def test_a_dead_rank_ends_the_torchrun_job_and_the_run_resumes(tmp_path):
    _train(['--experiment', 'warm', '--epochs', '1'], tmp_path)  # builds the data cache first
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
           str(TRAIN), '--output', str(tmp_path), '--data-dir', str(tmp_path / 'cache'), '--experiment', 'ddp',
           '--epochs', '6', '--device', 'cpu', '--dist-timeout', '60'] + TINY
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = tmp_path / 'ddp' / 'checkpoints' / 'last'
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    workers = subprocess.run(['pgrep', '-f', 'experiment ddp'], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in workers if int(p) != proc.pid]
    assert len(workers) >= 2
    os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-training
    start = time.time()
    proc.wait(timeout=180)
    assert proc.returncode != 0 and time.time() - start < 180
    resume = subprocess.run(cmd + ['--resume'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    results = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    # epoch 0: the starting weights, scored as the reference of the label-free scores (no source-only phase)
    assert results['world_size'] == 2 and [h['epoch'] for h in results['history']] == list(range(0, 7))


@pytest.mark.parametrize('make, error, message', [
    (lambda: timm.create_model('dida_resnet18.no_such_tag', pretrained=True), RuntimeError, 'Invalid pretrained tag'),
    (lambda: timm.create_model('dida_resnet18', features_only=True, feature_cls='no_such_cls'), AssertionError,
     'Unknown feature class'),
    (lambda: timm.create_model('dida_digitnet_compact')(torch.randn(1, 1, 32, 32)), RuntimeError,
     'expected input.* to have 3 channels'),
    (lambda: timm.create_model('dida_resnet18', dida_stages=(0,)), ValueError, 'dida_stages'),
    (lambda: timm.create_model('dida_resnet18', dida_reduction=1024), ValueError, 'leaves no channels'),
])
def test_bad_model_requests_fail_with_a_clear_message(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_cli_user_mistakes_end_with_a_message_not_a_stack_trace(tmp_path):
    for args, message in ((['--model', 'dida_digitnet_compact.no_such_tag', '--pretrained'], 'Invalid pretrained tag'),
                          (['--mixstyle-after', 'no_such_block'], 'no such module')):
        result = _train(['--experiment', args[1].replace('.', '_')] + args, tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert 'Traceback' not in result.stderr


def _repo_files(tmp_path, safe=True):
    import timm
    folder = tmp_path / ('safe' if safe else 'pickled')
    timm.models.save_for_hf(timm.create_model('dida_digitnet_compact', dida_reduction=8), str(folder),
                            model_args=dict(dida_reduction=8), safe_serialization=safe)
    return folder


def test_a_config_without_pretrained_cfg_is_refused_not_read_unchecked(tmp_path):
    from dida_timm.inference import create_model
    folder = _repo_files(tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    # a legacy config: timm makes every top-level key a pretrained_cfg key, `file` included
    legacy = dict(architecture=config['architecture'], num_classes=10, file=str(tmp_path / 'elsewhere.pth'))
    (folder / 'config.json').write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="field 'pretrained_cfg' is missing"):
        create_model(str(folder), pretrained=True)


def test_pickled_weights_of_a_local_repo_are_refused_unless_allowed(tmp_path):
    from dida_timm.inference import create_model, load_model
    folder = _repo_files(tmp_path, safe=False)
    assert not (folder / 'model.safetensors').exists()
    with pytest.raises(ValueError, match='no model.safetensors'):
        load_model(str(folder))
    assert create_model(f'local-dir:{folder}', pretrained=True, allow_pickle=True).num_classes == 10
    assert load_model(str(_repo_files(tmp_path))).num_classes == 10  # safetensors load as before


def test_hub_config_is_validated_at_the_revision_timm_loads(tmp_path, offline_hub):
    from dida_timm.inference import create_model
    from hf_cache import add_snapshot
    folder = _repo_files(tmp_path)
    files = {name: (folder / name).read_bytes() for name in ('config.json', 'model.safetensors')}
    add_snapshot(offline_hub, 'org/model', files)
    evil = json.loads(files['config.json'])
    evil['pretrained_cfg']['file'] = str(tmp_path / 'elsewhere.pth')
    add_snapshot(offline_hub, 'org/model', dict(files, **{'config.json': json.dumps(evil).encode()}), revision='v2')
    assert create_model('hf-hub:org/model', pretrained=True).num_classes == 10
    with pytest.raises(ValueError, match="field 'pretrained_cfg.file'"):
        create_model('hf-hub:org/model@v2', pretrained=True)


def test_hub_weights_missing_from_the_cache_are_refused_without_calling_them_missing_from_the_repo(
        tmp_path, offline_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError
    from dida_timm.inference import create_model
    from hf_cache import add_snapshot
    pickled = _repo_files(tmp_path, safe=False)
    add_snapshot(offline_hub, 'org/pickled', {n: (pickled / n).read_bytes() for n in ('config.json', 'pytorch_model.bin')})
    # offline, the Hub was never asked whether the repo has a model.safetensors: refused all the same (timm would
    # unpickle the cached pytorch_model.bin), but --allow-pickle is not the advice
    with pytest.raises(FileNotFoundError, match=r'hf-hub:org/pickled: model.safetensors could not be downloaded or '
                                                r'found in the cache \(.+\)$') as e:
        create_model('hf-hub:org/pickled', pretrained=True)
    assert 'allow' not in str(e.value)
    real_download = huggingface_hub.hf_hub_download

    def hub_answers_no_such_file(repo_id, filename, **kwargs):
        if filename == 'model.safetensors':
            raise EntryNotFoundError(f'{repo_id} has no {filename}')
        return real_download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', hub_answers_no_such_file)
    with pytest.raises(ValueError, match='hf-hub:org/pickled: no model.safetensors, .* --allow-pickle'):
        create_model('hf-hub:org/pickled', pretrained=True)


def test_hub_checks_read_the_cache_dir_timm_loads_from(tmp_path, offline_hub):
    from dida_timm.inference import create_model
    from hf_cache import add_snapshot
    safe, pickled = _repo_files(tmp_path), _repo_files(tmp_path, safe=False)
    own_cache = tmp_path / 'own_cache'
    # the default cache holds safetensors weights, the cache_dir timm loads from only a pickle: checking the
    # default one let timm unpickle the other's
    add_snapshot(offline_hub, 'org/two-caches', {n: (safe / n).read_bytes() for n in ('config.json', 'model.safetensors')})
    add_snapshot(own_cache, 'org/two-caches', {n: (pickled / n).read_bytes() for n in ('config.json', 'pytorch_model.bin')})
    with pytest.raises(FileNotFoundError, match='hf-hub:org/two-caches: model.safetensors could not be downloaded'):
        create_model('hf-hub:org/two-caches', pretrained=True, cache_dir=str(own_cache))
    assert create_model('hf-hub:org/two-caches', pretrained=True).num_classes == 10
    # a repo only the cache_dir holds: its config is read there too
    add_snapshot(own_cache, 'org/own-cache-only', {n: (safe / n).read_bytes() for n in ('config.json', 'model.safetensors')})
    assert create_model('hf-hub:org/own-cache-only', pretrained=True, cache_dir=own_cache).num_classes == 10


def _broadcast_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        Path(out_dir, str(rank)).write_text(broadcast_from_main(f'clock of rank {rank}'))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_takes_rank_0s_run_folder_name(tmp_path):
    # torchrun's ranks reach the clock at different times (seconds apart under load): a name built from each rank's
    # clock sent rank 1 to a folder that was never made, and the run failed at its end
    torch.multiprocessing.spawn(_broadcast_rank, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    assert [Path(tmp_path, str(r)).read_text() for r in (0, 1)] == ['clock of rank 0'] * 2
    assert broadcast_from_main('alone') == 'alone'  # no process group: the value itself


def _train_rank(rank: int, init_file: str, out_dir: str) -> None:
    from timm.utils import ModelEmaV3
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same start on both ranks, as DDP makes it
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
        ema = ModelEmaV3(net, decay=0.9)
        model = nn.parallel.DistributedDataParallel(MultiViewModel(net))
        torch.manual_seed(1 + rank)  # each rank's own batches
        batches = [(torch.randn(4, 3, 4, 4) + rank, torch.randint(0, 2, (4,))) for _ in range(2)]
        train_one_epoch(model, UdaConfig(method='source_only'), batches, None, torch.optim.SGD(net.parameters(), 0.1),
                        ema=ema, world_size=2)
        buffers = dict(net=dict(net.named_buffers()), ema=dict(ema.module.named_buffers()))
        torch.save(buffers, Path(out_dir, f'{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_ends_an_epoch_with_rank_0s_batchnorm_statistics_and_ema(tmp_path):
    # DDP syncs the gradients only: each rank's running statistics followed its own batches
    torch.multiprocessing.spawn(_train_rank, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{r}.pt') for r in (0, 1)]
    for part in ('net', 'ema'):
        assert ranks[0][part].keys() == ranks[1][part].keys() and 'running_mean' in ''.join(ranks[0][part])
        for name, buffer in ranks[0][part].items():
            assert torch.equal(buffer, ranks[1][part][name]), f'{part} {name}'


def test_evaluate_refuses_a_model_whose_outputs_are_not_the_class_count():
    from dida_timm.training import evaluation

    class AlwaysLast(nn.Module):  # five outputs, always class 4
        def forward(self, x):
            return torch.arange(5.).expand(len(x), 5)

    images = torch.zeros(4, 1)
    # with 3 classes the flat confusion index label * 3 + 4 put each prediction of class 4 into the next row: the
    # 0%-accurate model scored 75%
    with pytest.raises(ValueError, match='the model gives 5 class scores, num_classes is 3'):
        evaluation.evaluate(AlwaysLast(), torch.utils.data.TensorDataset(images, torch.tensor([0, 0, 0, 1])), 3)
    model = AlwaysLast().train()
    with pytest.raises(ValueError, match=r'label 5, past num_classes \(5\)'):
        evaluation.evaluate(model, torch.utils.data.TensorDataset(images, torch.tensor([0, 5, 0, 1])), 5)
    assert model.training  # the mode it was given, though the evaluation failed
    assert evaluation.evaluate(AlwaysLast(), torch.utils.data.TensorDataset(images, torch.tensor([4, 4, 0, 1])),
                               5)['accuracy'] == 50.0
