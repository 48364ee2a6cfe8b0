"""Export to a Hugging Face repo folder, every loading path (offline), pushing, prediction and fine-tuning."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from PIL import Image

from dida_timm.hub import export_runs, model_card, push_folder, read_run
from dida_timm.inference import label_free_config, load_model, main as predict_main, predict_images, smallest_input_size
from hf_cache import add_snapshot

REPO = Path(__file__).resolve().parents[1]
TINY = ['--offline-train-size', '160', '--offline-test-size', '100', '--batch-size', '8', '--no-progress',
        '--tsne-per-domain', '0']


def _run_train(args, cwd=REPO):
    result = subprocess.run([sys.executable, str(REPO / 'train' / 'train.py')] + args, cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    _run_train(['--output', str(out), '--data-dir', str(out / 'cache'), '--experiment', 'run', '--epochs', '1',
                '--source-only-epochs', '1', '--model-kwargs', '{dida_reduction: 8}'] + TINY)
    return out / 'run'


@pytest.fixture(scope='module')
def exported(trained_run, tmp_path_factory):
    return export_runs([trained_run], tmp_path_factory.mktemp('export') / 'repo', 'dida-timm/test-model')


def _reference_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model('dida_digitnet_compact', num_classes=10, dida_reduction=8)
    model.load_state_dict(safetensors.torch.load_file(str(run / 'model.safetensors')))
    return model.eval()(x)


def test_export_writes_timm_config_weights_and_a_card_from_results(exported, trained_run):
    config = json.loads((exported / 'config.json').read_text())
    results = json.loads((trained_run / 'results.json').read_text())
    assert config['architecture'] == 'dida_digitnet_compact' and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    assert config['model_args']['dida_reduction'] == 8
    card = (exported / 'README.md').read_text()
    front = yaml.safe_load(card.split('---')[1])
    assert front['library_name'] == 'timm' and 'domain-adaptation' in front['tags']
    metric = front['model-index'][0]['results'][0]['metrics'][0]
    assert metric['value'] == round(results['target_accuracy'], 2)
    assert f"| mnistm_style | target | {results['target_accuracy']:.2f} |" in card
    # the Reproduce command, with the run's folders as .../NAME
    assert results['command'].split(' --offline-train-size')[1] in card and 'last epoch' in card.lower()
    assert '--output .../' in card and str(Path(results['command'].split()[3]).parent) not in card


def test_card_states_the_step_and_strong_view_the_run_used(trained_run):
    run = read_run(trained_run)
    card = model_card([run], 'dida-timm/test-model')
    assert "forward mode 'joint'" in card and 'without dropout' not in card
    assert 'timm RandAugment `rand-m10-n2-mstd0.5`' in card
    run['args'].update(forward_mode='separate', pseudo_label_dropout=False, rand_augment='fixmatch')
    card = model_card([run], 'dida-timm/test-model')
    assert "forward mode 'separate', pseudo-label pass without dropout" in card
    assert "FixMatch's RandAugment" in card and 'rand-m10' not in card
    assert 'threshold 0.95, hard mask' in card
    # soft weighting drops no pseudo-label: the card names no threshold for it
    run['args'].update(soft_weighting=True)
    card = model_card([run], 'dida-timm/test-model')
    assert 'pseudo-labels: soft weighting (confidence-weighted, none dropped),' in card and 'threshold 0.95' not in card


def test_card_says_when_the_selected_checkpoint_is_the_static_start_with_its_branch_muted(trained_run):
    run = read_run(trained_run)
    assert 'branch muted' not in model_card([run], 'dida-timm/test-model')
    run['selection']['epoch'] = 0
    run['history'] = [dict(run['history'][0], epoch=0, phase='static_start')] + run['history']
    assert 'the weights carry the branch muted' in model_card([run], 'dida-timm/test-model')


def test_local_dir_and_plain_folder_load_the_exported_weights(exported, trained_run):
    x = torch.randn(2, 3, 32, 32)
    expected = _reference_logits(trained_run, x)
    for spec in (f'local-dir:{exported}', str(exported)):
        torch.testing.assert_close(load_model(spec)(x), expected)


def test_hf_hub_id_loads_from_a_local_hub_cache(exported, trained_run, offline_hub):
    add_snapshot(offline_hub, 'dida-timm/test-model',
                 {name: (exported / name).read_bytes() for name in ('config.json', 'model.safetensors')})
    model = timm.create_model('hf-hub:dida-timm/test-model', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _reference_logits(trained_run, x))
    assert model.pretrained_cfg['label_names'] == [str(i) for i in range(10)]


def test_pretrained_cfg_overlay_file_loads_the_weights(exported, trained_run):
    model = timm.create_model('dida_digitnet_compact', pretrained=True, dida_reduction=8,
                              pretrained_cfg_overlay=dict(file=str(exported / 'model.safetensors'))).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _reference_logits(trained_run, x))


def test_unknown_architecture_explains_that_dida_timm_must_be_imported(exported, tmp_path):
    folder = tmp_path / 'future'
    shutil.copytree(exported, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'dida_future_net'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match='import dida_timm'):
        load_model(str(folder))


def test_push_dry_run_lists_the_files_and_a_missing_token_is_refused(exported, monkeypatch, tmp_path):
    assert push_folder(exported, 'dida-timm/test-model', dry_run=True) == ['README.md', 'config.json',
                                                                           'model.safetensors']
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_TOKEN_PATH', str(tmp_path / 'hf_home' / 'token'))
    monkeypatch.setattr(c, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'hf_home' / 'stored_tokens'))
    with pytest.raises(RuntimeError, match='no Hugging Face token'):
        push_folder(exported, 'dida-timm/test-model')
    with pytest.raises(FileNotFoundError, match='not an exported repo folder'):
        push_folder(tmp_path, 'dida-timm/test-model', dry_run=True)


def test_push_without_network_fails_with_the_reason(exported, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens on the discard port
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'ENDPOINT', 'http://127.0.0.1:9')
    with pytest.raises(RuntimeError, match='pushing .* failed'):
        push_folder(exported, 'dida-timm/test-model')


def test_predict_command_writes_one_row_per_image(exported, tmp_path):
    images = tmp_path / 'new_domain'
    rng = np.random.default_rng(0)
    for i in range(5):
        (images / f'sub{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(images / f'sub{i % 2}' / f'{i}.png')
    out = tmp_path / 'preds.csv'
    assert predict_main(['--model', str(exported), '--images', str(images), '--output', str(out), '--topk', '3',
                         '--batch-size', '2']) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and {r['label_1'] for r in rows} <= {str(i) for i in range(10)}
    for r in rows:
        assert float(r['confidence_1']) >= float(r['confidence_2']) >= float(r['confidence_3'])


def test_fine_tuning_from_an_exported_folder_reheads_the_classifier(exported, tmp_path):
    rng = np.random.default_rng(0)
    for domain in ('a', 'b'):
        for c in ('cat', 'dog', 'fox'):
            (tmp_path / 'data' / domain / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / 'data' / domain / c / f'{i}.png')
    Image.new('RGB', (32, 32)).save(tmp_path / 'data' / 'a' / 'cat' / 'extra.bmp')  # not read, and said so
    _run_train(['--dataset', 'folder', '--data-dir', str(tmp_path / 'data'), '--source', 'a', '--target', 'b',
                '--model', f'local-dir:{exported}', '--pretrained', '--epochs', '1', '--batch-size', '4',
                '--output', str(tmp_path / 'out'), '--experiment', 'ft', '--no-progress', '--tsne-per-domain', '0'])
    results = json.loads((tmp_path / 'out' / 'ft' / 'results.json').read_text())
    assert results['classes'] == ['cat', 'dog', 'fox'] and results['architecture'] == 'dida_digitnet_compact'
    weights = safetensors.torch.load_file(str(tmp_path / 'out' / 'ft' / 'model.safetensors'))
    assert weights['head.fc.weight'].shape == (3, 128)
    log = (tmp_path / 'out' / 'ft' / 'log.txt').read_text()
    assert "domain a (train): 1 files left out, not having an image extension (.jpeg .jpg .png): suffixes ['.bmp']" \
        in log and 'domain b (train)' not in log
    # exported again: the network is rebuilt with the arguments the first export carried (dida_reduction 8, which
    # this run's --model-kwargs never named; the rebuild without them failed on the branch's shapes), and the card
    # names the local folder it started from without its path
    repo = export_runs([tmp_path / 'out' / 'ft'], tmp_path / 'again', 'dida-timm/fine-tuned')
    assert json.loads((repo / 'config.json').read_text())['model_args']['dida_reduction'] == 8
    x = torch.randn(2, 3, 32, 32)
    reference = timm.create_model('dida_digitnet_compact', num_classes=3, dida_reduction=8).eval()
    reference.load_state_dict(weights)
    torch.testing.assert_close(load_model(f'local-dir:{repo}')(x), reference(x))
    card = (repo / 'README.md').read_text()  # its Reproduce command included
    assert str(tmp_path) not in card and f'started from the weights of the local export `{exported.name}`' in card
    # class folders without splits: the source's "test" images are the ones it trained on, and the card says so
    assert results['sources_tested_on_training_images'] == ['a'] and '| a | source, on images it trained on |' in card


def test_the_cards_command_names_no_folder_of_the_training_machine(trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    results = json.loads((run / 'results.json').read_text())
    machine = '/srv/someone/experiments'
    results['command'] = (f'python train/train.py --dataset pacs --data-dir {machine}/PACS --output={machine}/runs '
                          f'--model local-dir:{machine}/my-export --target-dir "{machine}/new photos" --lr 0.01')
    (run / 'results.json').write_text(json.dumps(results))
    card = (export_runs([run], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert machine not in card
    assert ("python train/train.py --dataset pacs --data-dir .../PACS --output=.../runs --model local-dir:.../my-export "
            "--target-dir '.../new photos' --lr 0.01") in card


def test_the_cards_evaluation_split_is_the_labelled_folder_a_target_eval_dir_run_measured(trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    args = yaml.safe_load((run / 'args.yaml').read_text())
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(args, target_eval_dir='/srv/someone/labelled-photos')))
    card = (export_runs([run], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert 'split: labelled folder labelled-photos' in card and '/srv/someone' not in card


def test_the_card_of_a_target_dir_run_calls_its_target_a_folder_not_a_domain_of_the_dataset(trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    results = json.loads((run / 'results.json').read_text())
    target = results['target']
    args = yaml.safe_load((run / 'args.yaml').read_text())
    plain = (export_runs([run], tmp_path / 'plain', 'dida-timm/x') / 'README.md').read_text()
    assert f'the **{target}** domain of `offline_digits`' in plain and 'type: offline_digits' in plain
    # the same results as a run that adapted to a folder named like a PACS domain, with a labelled eval folder
    accuracy = {d: a for d, a in results['per_domain_accuracy'].items() if d != target}
    accuracy['sketch'] = results['per_domain_accuracy'][target]
    results = dict(results, dataset='pacs', target='sketch', target_dir='/srv/someone/sketch',
                   per_domain_accuracy=accuracy)
    (run / 'results.json').write_text(json.dumps(results))
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(args, target_dir='/srv/someone/sketch',
                                                       target_eval_dir='/srv/someone/labelled')))
    card = (export_runs([run], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert 'domain of `pacs`' not in card and 'the unlabelled folder `sketch`' in card
    assert '- target (unlabelled during training): the folder `sketch` (--target-dir)' in card
    assert '- transductive: no, the labelled evaluation folder shares no image with the folder trained on' in card
    assert 'type: sketch' in card and 'DIDA-Net paper' not in card  # PACS's sketch number is not this target's
    assert 'None: the target is a folder of images (`sketch`), not a domain the paper evaluated.' in card
    # no labelled folder: nothing evaluated on the target, so nothing to call transductive or not
    results = dict(results, target_accuracy=None, target_per_class_accuracy=None,
                   per_domain_accuracy={d: a for d, a in accuracy.items() if d != 'sketch'})
    (run / 'results.json').write_text(json.dumps(results))
    card = (export_runs([run], tmp_path / 'unlabelled', 'dida-timm/x') / 'README.md').read_text()
    assert '- transductive: not applicable, no labelled target images were evaluated' in card


def test_the_model_index_gives_the_accuracy_of_the_weights_shipped_not_the_seeds_mean(trained_run, tmp_path):
    other = tmp_path / 'other'
    shutil.copytree(trained_run, other)
    results = json.loads((other / 'results.json').read_text())
    shipped = json.loads((trained_run / 'results.json').read_text())['target_accuracy']
    (other / 'results.json').write_text(json.dumps(dict(results, seed=1, target_accuracy=shipped + 10)))
    card = (export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert f'value: {round(shipped, 2)}' in card


def test_the_cards_recipe_names_the_warm_up_ema_mixstyle_and_unlabelled_weight_a_run_used(trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    args = yaml.safe_load((run / 'args.yaml').read_text())
    plain = (export_runs([run], tmp_path / 'plain', 'dida-timm/x') / 'README.md').read_text()
    assert 'warm-up' not in plain and 'EMA of the weights' not in plain and 'MixStyle' not in plain
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(args, warmup_epochs=2, ema_decay=0.999, mixstyle_after='block1',
                                                       unlabelled_weight=0.5)))
    card = (export_runs([run], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert '; 2 warm-up epochs per phase; EMA of the weights (decay 0.999); MixStyle after `block1`' in card
    assert "unlabelled stream 'target' (loss weight 0.5)" in card


def test_export_refuses_runs_that_are_not_seeds_of_one_setting(trained_run, tmp_path):
    other = tmp_path / 'other'
    shutil.copytree(trained_run, other)
    args = yaml.safe_load((other / 'args.yaml').read_text())
    (other / 'args.yaml').write_text(yaml.safe_dump(dict(args, lr=args['lr'] * 10, workers=3)))
    with pytest.raises(ValueError, match=r"differs from .* in \['--lr 0.05 -> 0.5'\]: not seeds of one setting"):
        export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x')  # --workers may differ
    (other / 'args.yaml').write_text(yaml.safe_dump(args))
    with pytest.raises(ValueError, match=r'the runs repeat a seed \(\[0, 0\]\)'):
        export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x')
    # another seed, recorded by a version without one of the options: seeds of one setting
    results = json.loads((other / 'results.json').read_text())
    (other / 'results.json').write_text(json.dumps(dict(results, seed=1)))
    (other / 'args.yaml').write_text(yaml.safe_dump({k: v for k, v in args.items() if k != 'decay_rate'}))
    card = (export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x') / 'README.md').read_text()
    assert 'mean ± std over seeds 0, 1' in card


def test_card_registers_an_architecture_that_import_dida_timm_does_not(trained_run):
    from dida_timm import register_dida
    run = read_run(trained_run)
    assert 'register_dida' not in model_card([run], 'dida-timm/test-model')
    run['architecture'] = register_dida('resnet10t')
    assert "dida_timm.register_dida('resnet10t')" in model_card([run], 'dida-timm/test-model')


def test_card_never_shows_the_path_of_a_folder_the_run_started_from(trained_run):
    run = read_run(trained_run)
    for spec in ('/srv/someone/exports/my_export', 'local-dir:/srv/someone/exports/my_export'):
        run.update(model=spec, pretrained_weights=spec)
        card = model_card([run], 'dida-timm/test-model')
        assert '/srv/someone' not in card and 'the local export `my_export`' in card


PUBLISHED = [f'dida_digitnet_compact.offline_{t}'
             for t in ('mnist', 'mnistm_style', 'syn_style', 'svhn_style', 'uci_digits')]


def test_every_shipped_config_names_its_own_tag_and_card():
    for name in PUBLISHED:
        config = json.loads((REPO / 'hub' / 'checkpoints' / name / 'config.json').read_text())
        architecture, tag = name.split('.')
        assert (config['architecture'], config['pretrained_cfg']['tag']) == (architecture, tag), name
        target = tag[len('offline_'):]
        note, = config['pretrained_cfg']['notes']
        assert f'-> {target})' in note and note.endswith('; card: README.md'), name


def test_export_names_the_tag_of_its_folder(trained_run, tmp_path):
    from dida_timm.hub import export_tag
    out = export_runs([trained_run], tmp_path / 'dida_digitnet_compact.offline_mnistm_style', 'dida-timm/x')
    pretrained_cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert pretrained_cfg['tag'] == 'offline_mnistm_style'
    note, = pretrained_cfg['notes']
    assert note.startswith('fixmatch on offline_digits (') and '-> mnistm_style) at 32 px' in note
    assert note.endswith('; card: README.md')
    assert export_tag('dida_digitnet_compact', tmp_path / 'repo', 'offline_digits', 'svhn_style') == \
        'offline_digits_svhn_style'


def _tracked_files_containing(needles: list) -> list:
    if not (REPO / '.git').exists():
        pytest.skip('not a git checkout: the tracked files are unknown')
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True).stdout
    offending = []
    for name in filter(None, files.decode().split('\0')):
        path = REPO / name
        data = path.read_bytes() if path.is_file() else b''
        if b'\0' not in data and any(n in data for n in needles):
            offending.append(name)
    return offending


def test_no_tracked_file_names_a_path_of_the_build_machine():
    prefixes = [f'/{d}/'.encode() for d in ('work', 'root', 'home')]  # spelled so this file does not match
    offending = _tracked_files_containing(prefixes)
    assert not offending, f'absolute paths of a build machine in {offending}'


def test_no_tracked_file_cites_a_document_outside_the_repository():
    # the design notes the project was built from live beside the checkout; docs/METHOD.md is their public form
    names = ['SP' + 'EC', 'shared' + '/', 'DA' + 'TA.md', 'STY' + 'LE.md']  # spelled so this file does not match
    offending = _tracked_files_containing([n.encode() for n in names])
    assert not offending, f'citations of documents outside the repository in {offending}'

@pytest.mark.parametrize('name', PUBLISHED)
def test_published_checkpoint_loads_strict_and_predicts_as_the_literal_reference(name):
    import types
    from dida_timm.layers import DidaModule
    from dida_timm.layers.dida_reference import dida_forward_per_sample
    from dida_timm.models._published import published_folder
    model = timm.create_model(name.split('.')[0]).eval()
    model.load_state_dict(safetensors.torch.load_file(str(published_folder(name) / 'model.safetensors')), strict=True)
    units = [m for m in model.modules() if isinstance(m, DidaModule)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for m in units]
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        for h in hooks:
            h.remove()
        for unit in units:
            reference = dida_forward_per_sample(unit, inputs[unit])
            assert (unit(inputs[unit]) - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())
            unit.forward = types.MethodType(dida_forward_per_sample, unit)
        reference_logits = model(x)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), reference_logits.argmax(1))


def test_every_published_checkpoint_is_registered():
    assert timm.list_pretrained('dida_digitnet_compact.offline_*') == sorted(PUBLISHED)


@pytest.mark.slow
@pytest.mark.parametrize('name', PUBLISHED)
def test_published_checkpoint_matches_its_card(name, tmp_path_factory):
    from dida_timm.data import create_domain_datasets, create_uda_transforms
    from dida_timm.training import evaluate
    model = timm.create_model(name, pretrained=True).eval()
    card = (Path(model.pretrained_cfg['file']).parent / 'README.md').read_text()
    claimed = yaml.safe_load(card.split('---')[1])['model-index'][0]['results'][0]['metrics'][0]['value']
    target = name.split('offline_', 1)[1]
    tf = create_uda_transforms(32, model.pretrained_cfg['mean'], model.pretrained_cfg['std'])['test']
    dataset, = create_domain_datasets('offline_digits', tmp_path_factory.getbasetemp() / 'published_cache',
                                      [target], 'test', transform=tf)
    measured = evaluate(model, dataset, 10)['accuracy']
    assert abs(measured - claimed) <= 0.5, f'{name}: card says {claimed}, measured {measured:.2f}'


def test_prediction_preprocesses_as_the_models_own_config_says(tmp_path):
    from PIL import Image
    from dida_timm.inference import predict_images
    for i in range(3):  # wide images: a centre crop and a squash see different pixels
        pixels = np.random.default_rng(i).integers(0, 256, (20, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f'{i}.png')
    for crop in (dict(crop_pct=0.5, crop_mode='center'), dict(crop_pct=1.0, crop_mode='squash')):
        torch.manual_seed(0)
        model = timm.create_model('digitnet_compact', num_classes=3, pretrained_cfg_overlay=crop).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        probabilities = []
        rows = list(predict_images(model, tmp_path, probabilities=probabilities))
        with torch.no_grad():
            expected = model(torch.stack([transform(Image.open(r['image']).convert('RGB')) for r in rows]))
        torch.testing.assert_close(torch.cat(probabilities), expected.double().softmax(-1))  # as the run scores them


def test_prediction_skips_unreadable_files_and_lists_them_with_the_reason(tmp_path, capsys):
    images = tmp_path / 'new_domain'
    (images / 'a' / 'b').mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = [images / 'a' / '0.png', images / 'a' / 'b' / '1.jpg', images / '2.png']
    for path in good:
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    (images / 'a' / 'empty.png').write_bytes(b'')
    (images / 'a' / 'b' / 'corrupt.jpg').write_bytes(good[1].read_bytes()[:200])  # truncated JPEG
    (images / 'not_an_image.png').write_text('a text file with an image name')
    (images / 'a' / 'notes.txt').write_text('not an image either')
    out = tmp_path / 'preds.csv'
    args = ['--model', 'dida_digitnet_compact.offline_mnist', '--images', str(images), '--output', str(out)]
    assert predict_main(args) == 0
    assert 'estimated accuracy by COT on these 3 images' in capsys.readouterr().out  # the export carries T and shares
    assert sorted(r['image'] for r in csv.DictReader(out.open())) == sorted(map(str, good))
    unreadable = {Path(r['image']).name: r['error'] for r in csv.DictReader((tmp_path / 'preds_unreadable.csv').open())}
    assert set(unreadable) == {'empty.png', 'corrupt.jpg', 'not_an_image.png', 'notes.txt'}
    assert 'cannot identify image file' in unreadable['empty.png'] and 'not an image file' in unreadable['notes.txt']
    for path in good:  # nothing readable left: exit 1, the list still written
        path.unlink()
    assert predict_main(args) == 1
    assert len(list(csv.DictReader((tmp_path / 'preds_unreadable.csv').open()))) == 4
    assert not out.exists()  # the predictions of the run before, for other images, are not left behind


def test_prediction_writes_an_image_whose_name_is_not_utf8_under_its_own_name(tmp_path):
    images = tmp_path / 'new_domain'
    images.mkdir()
    name = b'caf\xe9.png'  # a Latin-1 file name, as old archives carry
    Image.new('RGB', (32, 32)).save(os.path.join(os.fsencode(images), name))
    out = tmp_path / 'preds.csv'
    assert predict_main(['--model', 'dida_digitnet_compact.offline_mnist', '--images', str(images),
                         '--output', str(out), '--device', 'cpu']) == 0
    row, = csv.DictReader(out.open(newline='', errors='surrogateescape'))
    assert os.fsencode(row['image']) == os.path.join(os.fsencode(images), name)

def test_export_of_a_from_scratch_run_predicts_at_its_input_size_and_claims_no_pretrained_weights(tmp_path):
    # dida_resnet18's default tag is ImageNet (224 px); this run trains it from scratch at 32 px
    _run_train(['--output', str(tmp_path), '--data-dir', str(tmp_path / 'cache'), '--experiment', 'scratch',
                '--model', 'dida_resnet18', '--input-size', '32', '--method', 'source_only', '--epochs', '1',
                '--source', 'mnist', '--target', 'uci_digits', '--offline-train-size', '16', '--offline-test-size',
                '10', '--batch-size', '8', '--eval-batch-size', '64', '--no-progress', '--tsne-per-domain', '0'])
    results = json.loads((tmp_path / 'scratch' / 'results.json').read_text())
    assert results['test_data_config']['input_size'] == [3, 32, 32] and results['pretrained_weights'] is None
    repo = export_runs([tmp_path / 'scratch'], tmp_path / 'repo', 'dida-timm/scratch')
    config = json.loads((repo / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    # the export names its own tag, never the architecture's ImageNet one
    assert 'tv_in1k' not in json.dumps(config) and config['pretrained_cfg']['tag'] == 'offline_digits_uci_digits'
    card = (repo / 'README.md').read_text()
    assert 'base_model' not in card.split('---')[1] and 'tv_in1k' not in card
    assert 'input 32 x 32 px' in card and 'trained from scratch' in card
    model = load_model(str(repo))
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == (3, 32, 32)
    assert timm.create_model(f'local-dir:{repo}').pretrained_cfg['input_size'] == (3, 32, 32)
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(np.full((100, 80, 3), 128, dtype=np.uint8)).save(images / 'x.png')
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    rows = list(predict_images(model, images, progress=False))
    assert len(rows) == 1 and seen == [(32, 32)]


def test_card_says_where_a_step_schedule_decays(trained_run):
    run = read_run(trained_run)
    card = model_card([run], 'dida-timm/test-model')
    assert 'cosine schedule' in card and 'of each phase' not in card
    run['args'].update(sched='multistep', decay_milestones=[10, 20], decay_rate=0.1)
    assert 'multistep schedule (lr x0.1 at epochs [10, 20] of each phase)' in model_card([run], 'dida-timm/x')


def test_default_tag_of_a_capitalised_target_is_a_valid_tag_and_a_bad_tag_names_its_option(tmp_path):
    from dida_timm.hub import export_tag
    # Office-Home's domains are capitalised, one with a space: its runs exported without --tag failed
    assert export_tag('dida_resnet50', tmp_path / 'repo', 'office_home', 'Real World') == 'office_home_real_world'
    with pytest.raises(ValueError, match=r"got 'Bad-Tag' \(from --tag, else from the output folder name "
                                         r"'dida_resnet50.Bad-Tag'"):
        export_tag('dida_resnet50', tmp_path / 'dida_resnet50.Bad-Tag', 'office_home', 'Art')


def test_push_refuses_a_repo_other_than_the_one_the_card_was_exported_for(exported):
    # the card's title and loading snippet name dida-timm/test-model: published elsewhere it points to that repo
    with pytest.raises(ValueError, match=r'was exported for dida-timm/test-model, not someone/else: re-export with '
                                         r'--repo-name someone/else'):
        push_folder(exported, 'someone/else', dry_run=True)
    result = subprocess.run([sys.executable, str(REPO / 'hub' / 'push.py'), str(exported), '--repo-id',
                             'someone/else', '--dry-run'], capture_output=True, text=True)
    assert result.returncode == 2 and 'error: ' in result.stderr and 'Traceback' not in result.stderr
    assert push_folder(exported, 'Dida-Timm/Test-Model', dry_run=True)  # the Hub's names are case-insensitive


def test_export_names_the_run_file_it_cannot_read(trained_run, tmp_path):
    other_network = safetensors.torch.save(timm.create_model('dida_digitnet_compact', num_classes=10).state_dict())
    for name, data in (('results.json', b'{"model": '), ('args.yaml', b'a: [b'), ('model.safetensors', b'\0' * 64),
                       ('model.safetensors', other_network)):
        run = tmp_path / 'run'
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(trained_run, run)
        (run / name).write_bytes(data)
        # the parsers' and load_state_dict's own messages name no file; a traceback or 'Expecting value' before
        with pytest.raises(ValueError, match=f"^{run / name} (is corrupt|cannot be loaded into dida_digitnet_compact)"):
            export_runs([run], tmp_path / 'repo', 'dida-timm/x')


def test_card_and_config_say_when_the_shipped_weights_were_never_adapted(trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    results = json.loads((run / 'results.json').read_text())
    assert [h['phase'] for h in results['history']] == ['source_only', 'fixmatch']
    for epoch, adapted in ((1, False), (2, True)):  # the source-only epoch the collapse guard falls back to, or not
        results['selection']['epoch'] = epoch
        (run / 'results.json').write_text(json.dumps(results))
        repo = export_runs([run], tmp_path / f'repo{epoch}', 'dida-timm/x')
        card = (repo / 'README.md').read_text()
        note, = json.loads((repo / 'config.json').read_text())['pretrained_cfg']['notes']
        claim = 'adapted to the **mnistm_style** domain of `offline_digits` without target labels, with DIDA-Net'
        assert (claim in card) == adapted and ('- Adapted to one target domain' in card) == adapted
        assert ('**not adapted** to the **mnistm_style** domain of `offline_digits`: its run of DIDA-Net\'s recipe '
                '(fixmatch;' in card) != adapted and ('ships epoch 1, a checkpoint from before adaptation '
                                                      '(source_only phase)' in card) != adapted
        assert note.endswith('; card: README.md') and ('; not adapted: ships epoch 1, from before adaptation '
                                                       '(source_only phase); card' in note) != adapted
    source_only = dict(read_run(run), method='source_only')
    card = model_card([source_only], 'dida-timm/x')
    assert 'trained on the labelled sources only, without adaptation: a baseline for the **mnistm_style**' in card
    assert 'without target labels, with DIDA-Net' not in card
    # no start of adaptation to compare with, and no pseudo-labels to mislead it
    assert source_only['source_only_start_target_accuracy'] is not None
    assert 'Source-only starting point' not in card and 'Pseudo-label training' not in card
    adapted_card = model_card([read_run(run)], 'dida-timm/x')
    assert 'Source-only starting point of the same run' in adapted_card and 'Pseudo-label training' in adapted_card


def test_every_shipped_checkpoint_from_before_adaptation_says_so():
    for name in PUBLISHED:
        folder = REPO / 'hub' / 'checkpoints' / name
        config, card = json.loads((folder / 'config.json').read_text()), (folder / 'README.md').read_text()
        source_only_epochs = int(re.search(r'- (\d+) source-only epochs, then', card).group(1))
        before = config['label_free']['selection']['epoch'] <= source_only_epochs
        note, = config['pretrained_cfg']['notes']
        assert ('; not adapted: ships epoch' in note) == before, name
        assert ('**not adapted** to the' in card) == before, name
        assert ('without target labels, with DIDA-Net' in card) != before, name


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_card_names_the_model_arguments_its_config_json_builds_with(name):
    from dida_timm.models._published import published_folder
    folder = published_folder(name)
    model_args = json.loads((folder / 'config.json').read_text())['model_args']
    line, = [t for t in (folder / 'README.md').read_text().splitlines() if 'model arguments' in t]
    assert json.loads(line.split('model arguments ', 1)[1].split(' (', 1)[0]) == model_args


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_tag_preprocesses_images_as_its_config_json_says(name):
    from dida_timm.models._published import published_folder
    exported = json.loads((published_folder(name) / 'config.json').read_text())['pretrained_cfg']
    resolved = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=True))
    for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'):  # timm's centre crop before
        assert resolved[key] == (tuple(exported[key]) if isinstance(exported[key], list) else exported[key]), key


def test_export_refuses_seeds_whose_network_preprocessing_or_data_differ(trained_run, tmp_path):
    # same options, but --model named a Hub repo or folder that changed between the runs, or --data-dir (which
    # seeds may move) other images
    other = tmp_path / 'other'
    shutil.copytree(trained_run, other)
    results = json.loads((other / 'results.json').read_text())
    train_images = results['data_images']['train']
    assert sorted(train_images) == sorted(results['sources'] + [results['target']]) and min(train_images.values()) > 0
    source = results['sources'][0]
    for key, value in (('model_args', dict(results['model_args'], dida_reduction=4)),
                       ('test_data_config', dict(results['test_data_config'], mean=[0.485, 0.456, 0.406])),
                       ('data_images', dict(results['data_images'],
                                            train=dict(train_images, **{source: train_images[source] + 1})))):
        (other / 'results.json').write_text(json.dumps(dict(results, seed=1, **{key: value})))
        with pytest.raises(ValueError, match=rf"differs from .* in \['{key}'\]: not seeds of one setting"):
            export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x')


def test_export_carries_the_license_of_the_pretrained_weights_it_derives_from(trained_run, tmp_path):
    from dida_timm import register_dida
    from dida_timm.hub import run_license
    assert run_license(read_run(trained_run)) == 'apache-2.0'  # trained from scratch
    register_dida('resnext101_32x8d')
    base = 'dida_resnext101_32x8d.fb_swsl_ig1b_ft_in1k'  # timm/resnext101_32x8d.fb_swsl_ig1b_ft_in1k: CC-BY-NC-4.0
    run = tmp_path / 'run'
    shutil.copytree(trained_run, run)
    results = json.loads((run / 'results.json').read_text())
    (run / 'results.json').write_text(json.dumps(dict(results, pretrained_weights=base)))
    repo = export_runs([run], tmp_path / 'repo', 'dida-timm/x')
    front = yaml.safe_load((repo / 'README.md').read_text().split('---')[1])
    assert front['license'] == 'cc-by-nc-4.0' and front['base_model'] == 'timm/resnext101_32x8d.fb_swsl_ig1b_ft_in1k'
    assert json.loads((repo / 'config.json').read_text())['pretrained_cfg']['license'] == 'cc-by-nc-4.0'
    repo = export_runs([run], tmp_path / 'repo', 'dida-timm/x', license='other')  # an explicit --license wins
    assert yaml.safe_load((repo / 'README.md').read_text().split('---')[1])['license'] == 'other'


def test_private_push_never_uploads_into_an_existing_public_repo(exported, monkeypatch):
    import types
    import huggingface_hub
    uploads = []

    class FakeApi:  # the Hub of a repo that exists already (create_repo with exist_ok keeps its visibility)
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def repo_info(self, repo_id):
            return types.SimpleNamespace(private=public_repo is False)

        def upload_folder(self, **kwargs):
            uploads.append(kwargs['repo_id'])

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_not_a_real_token')
    public_repo = True
    with pytest.raises(RuntimeError, match='dida-timm/test-model exists and is public, which --private does not'):
        push_folder(exported, 'dida-timm/test-model', private=True)
    assert uploads == []
    public_repo = False
    push_folder(exported, 'dida-timm/test-model', private=True)
    assert uploads == ['dida-timm/test-model']


def test_export_refuses_to_write_into_a_run_folder(trained_run, tmp_path):
    other = tmp_path / 'seed1'
    shutil.copytree(trained_run, other)
    results = json.loads((other / 'results.json').read_text())
    (other / 'results.json').write_text(json.dumps(dict(results, seed=1)))
    weights = (other / 'model.safetensors').read_bytes()
    (other / 'model.safetensors').write_bytes(weights[:-4] + b'\0\0\0\0')  # seed 1's own weights
    weights = (other / 'model.safetensors').read_bytes()
    with pytest.raises(ValueError, match=f'the output folder {other} is the run folder {other}'):
        export_runs([trained_run, other], other, 'dida-timm/x')
    assert (other / 'model.safetensors').read_bytes() == weights and not (other / 'README.md').exists()
    # another run's folder (not among the exported runs): its weights stay, and the folder is not pushed either
    with pytest.raises(ValueError, match=f'the output folder {other} holds a training run \\(results.json, '
                                         'args.yaml, checkpoints'):
        export_runs([trained_run], other, 'dida-timm/x')
    assert (other / 'model.safetensors').read_bytes() == weights and not (other / 'README.md').exists()
    for name in ('README.md', 'config.json'):  # as if exported into it with an earlier version
        (other / name).write_text('# dida-timm/x\n' if name == 'README.md' else '{}')
    with pytest.raises(ValueError, match='holds a training run .*export the run with hub/export.py into a folder'):
        push_folder(other, 'dida-timm/x', dry_run=True)


def test_card_of_several_seeds_names_the_epoch_each_selected(trained_run):
    import copy
    first = read_run(trained_run)
    first['selection']['epoch'] = 1
    second = copy.deepcopy(first)
    second.update(seed=1)
    assert 'selected without target labels (epoch 1, rule `guarded_last`' in model_card([first, second], 'dida-timm/x')
    second['selection']['epoch'] = 2
    card = model_card([first, second], 'dida-timm/x')
    assert 'selected without target labels (epochs 1, 2 of seeds 0, 1, rule `guarded_last`, see below)' in card


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_tag_notes_never_call_a_checkpoint_from_before_adaptation_adapted(name):
    from dida_timm.models._published import published_folder
    shipped, = json.loads((REPO / 'hub' / 'checkpoints' / name / 'config.json').read_text())['pretrained_cfg']['notes']
    note, = timm.models.get_pretrained_cfg(name).notes
    assert note.endswith(f"card: {published_folder(name) / 'README.md'}")
    assert not ('not adapted' in shipped and 'adapted to' in note), note


def test_card_of_a_source_only_run_lists_no_setting_it_did_not_use(trained_run):
    run = read_run(trained_run)
    card = model_card([run], 'dida-timm/x')
    assert '- batch 4 x 8 source + 8 target images per step' in card and '- pseudo-labels: threshold' in card
    run['method'] = 'source_only'
    card = model_card([run], 'dida-timm/x')
    assert '- batch 4 x 8 source images per step on each of 1 process(es)' in card
    assert 'pseudo-labels' not in card and 'strong view' not in card


@pytest.mark.parametrize('where', [dict(device='meta'), dict(dtype=torch.bfloat16)])
def test_smallest_input_size_probes_on_the_models_device_and_in_its_dtype(where):
    # a model without min_input_size or feature_info is probed with a forward; a float32 CPU probe failed at every
    # size on a GPU (here: meta) or half model, which was then said to take no input at all
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert smallest_input_size(net.to(**where)) == 4
    with pytest.raises(ValueError, match='no square input') as refused:
        smallest_input_size(torch.nn.Sequential(torch.nn.Linear(5, 2)).to(**where))
    assert isinstance(refused.value.__cause__, RuntimeError)  # why, for a model that takes none


def test_export_license_follows_the_license_a_run_recorded_for_its_hub_repo_or_folder(trained_run):
    from dida_timm.hub import run_license
    run = read_run(trained_run)
    for spec in ('local-dir:/srv/someone/nc_export', 'hf-hub:someone/nc-model', 'dida_digitnet_compact.offline_mnist'):
        run.update(pretrained_weights=spec, pretrained_license='cc-by-nc-4.0')
        assert run_license(run) == 'cc-by-nc-4.0', spec  # the registry knows nothing of the first two
        assert yaml.safe_load(model_card([run], 'dida-timm/x').split('---')[1])['license'] == 'cc-by-nc-4.0'
    # weights --init-checkpoint replaced: the recorded license is not theirs
    assert run_license(dict(run, init_checkpoint='/srv/someone/own.safetensors')) == 'apache-2.0'
    # runs that predate the record, or whose weights named no license: the registry's, else apache-2.0
    assert run_license(dict(run, pretrained_license=None)) == 'apache-2.0'
    run.pop('pretrained_license')
    assert run_license(run) == 'apache-2.0'


def test_card_of_a_timm_architecture_registers_nothing(trained_run):
    # a FixMatch baseline trained with `--model resnet18`: its snippet said register_dida('t18'), which raised
    run = read_run(trained_run)
    run.update(architecture='resnet18', model='resnet18', dida_kernels=None)
    assert 'register_dida' not in model_card([run], 'dida-timm/x')


def test_card_of_a_network_without_dida_units_neither_tags_nor_calls_it_dida_net(trained_run):
    run = read_run(trained_run)
    front = yaml.safe_load(model_card([run], 'dida-timm/x').split('---')[1])
    assert front['tags'] == ['image-classification', 'timm', 'domain-adaptation', 'dida-net', 'fixmatch']
    run.update(architecture='resnet18', model='resnet18', dida_kernels=None)  # a static FixMatch baseline
    card = model_card([run], 'dida-timm/x')
    assert "DIDA-Net's recipe" not in card and 'DIDA branch' not in card
    assert 'fixmatch training of a static network, without DIDA units (the static baseline of DIDA-Net; Deng' in card
    front = yaml.safe_load(card.split('---')[1])
    assert front['tags'] == ['image-classification', 'timm', 'domain-adaptation', 'fixmatch']
    run.pop('dida_kernels')  # a run that predates the record: told by its architecture's name
    assert 'dida-net' not in yaml.safe_load(model_card([run], 'dida-timm/x').split('---')[1])['tags']
    run['method'] = 'source_only'
    assert yaml.safe_load(model_card([run], 'dida-timm/x').split('---')[1])['tags'] == ['image-classification', 'timm']


def test_export_refuses_seeds_that_ran_on_other_process_counts(trained_run, tmp_path):
    other = tmp_path / 'other'
    shutil.copytree(trained_run, other)
    results = json.loads((other / 'results.json').read_text())
    assert results['world_size'] == 1
    (other / 'results.json').write_text(json.dumps(dict(results, seed=1, world_size=2)))
    with pytest.raises(ValueError, match=r"differs from .* in \['world_size 1 -> 2'\]: not seeds of one setting"):
        export_runs([trained_run, other], tmp_path / 'repo', 'dida-timm/x')


def test_card_of_several_seeds_gives_the_last_epochs_accuracy_over_the_seeds(trained_run):
    import copy
    first = read_run(trained_run)
    first['last_target_accuracy'] = 50.0
    second = copy.deepcopy(first)
    second.update(seed=1, last_target_accuracy=60.0)
    assert 'Target accuracy of the last epoch, for comparison: 50.00%.' in model_card([first], 'dida-timm/x')
    card = model_card([first, second], 'dida-timm/x')
    assert 'Target accuracy of the last epoch, for comparison: 55.00 ± 7.07% (mean ± std over seeds 0, 1).' in card


def test_export_of_an_older_run_from_a_relative_folder_named_arch_tag_does_not_crash(trained_run, tmp_path,
                                                                                     monkeypatch):
    from dida_timm.hub import run_license
    # an older run recorded `--model dida_digitnet_compact.my_export --pretrained` as given: a folder beside the
    # training's working directory, not here, and no tag of timm's registry
    run = read_run(trained_run)
    run.update(pretrained_weights='dida_digitnet_compact.my_export')
    run.pop('pretrained_license', None)
    monkeypatch.chdir(tmp_path)
    assert run_license(run) == 'apache-2.0'
    card = model_card([run], 'dida-timm/x')
    assert 'base_model' not in card.split('---')[1] and str(tmp_path) not in card


def test_push_lists_only_the_files_upload_folder_sends(exported, tmp_path):
    folder = tmp_path / 'repo'
    shutil.copytree(exported, folder)
    for name in ('.git/config', '.cache/huggingface/upload/README.md.metadata', 'sub/.git/HEAD'):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text('not uploaded')
    (folder / 'extra' / 'notes.txt').parent.mkdir()
    (folder / 'extra' / 'notes.txt').write_text('uploaded')
    assert push_folder(folder, 'dida-timm/test-model', dry_run=True) == ['README.md', 'config.json', 'extra/notes.txt',
                                                                         'model.safetensors']


def test_prediction_runs_a_model_in_eval_mode_and_leaves_it_as_it_was(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    torch.manual_seed(0)
    model = timm.create_model('dida_digitnet_compact', num_classes=10)  # train mode, as create_model leaves it
    with torch.no_grad():  # running statistics far from a batch's: train-mode batch norm would change every output
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probs = {}
    for batch_size in (6, 2):
        probabilities = []
        list(predict_images(model, tmp_path, batch_size=batch_size, probabilities=probabilities, progress=False))
        probs[batch_size] = torch.cat(probabilities)
        assert model.training
    torch.testing.assert_close(probs[6], probs[2])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_prediction_refuses_an_output_it_cannot_write_before_predicting(tmp_path, capsys, monkeypatch):
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (32, 32)).save(images / 'x.png')
    (tmp_path / 'a_file').write_text('')
    import dida_timm.inference as inference
    monkeypatch.setattr(inference, 'load_model', lambda *a, **k: pytest.fail('predicted before checking --output'))
    with pytest.raises(SystemExit) as exit_info:
        predict_main(['--model', 'dida_digitnet_compact.offline_mnist', '--images', str(images),
                      '--output', str(tmp_path / 'a_file' / 'preds.csv')])
    assert exit_info.value.code == 2
    assert f"--output: cannot write {tmp_path / 'a_file' / 'preds.csv'}" in capsys.readouterr().err


def test_prediction_refuses_an_edited_label_free_section_naming_the_value_before_predicting(tmp_path, capsys):
    from dida_timm.models._published import published_folder
    repo = tmp_path / 'repo'
    shutil.copytree(published_folder('dida_digitnet_compact.offline_mnist'), repo)
    config = json.loads((repo / 'config.json').read_text())
    config['label_free']['label_share'] = config['label_free']['label_share'][:9]  # 9 shares for 10 classes
    (repo / 'config.json').write_text(json.dumps(config))
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (32, 32)).save(images / 'x.png')
    out = tmp_path / 'preds.csv'
    assert predict_main(['--model', str(repo), '--images', str(images), '--output', str(out)]) == 2
    assert 'label_free.label_share must list 10 non-negative class shares' in capsys.readouterr().err
    assert not out.exists()
    original = dict(config['label_free'], label_share=[0.1] * 10)
    for key, value in (('atc_score', 'confidence'), ('atc_threshold', None), ('atc_tie_share', 1.5),
                       ('temperature', -1.0), ('guard', {'min_ratio': 1}), ('guard', {'min_effective_ratio': '0.95'}),
                       ('target_scores', {'effective_classes': 9.5})):
        config['label_free'] = dict(original, **{key: value})
        (repo / 'config.json').write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f'label_free.{key} must'):
            label_free_config(str(repo), 10)
    config['label_free'] = original
    (repo / 'config.json').write_text(json.dumps(config))
    assert label_free_config(str(repo), 10) == original


def test_prediction_from_a_run_folder_or_a_weights_file_says_what_to_give_instead(trained_run, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (32, 32)).save(images / 'x.png')
    out = str(tmp_path / 'preds.csv')
    assert predict_main(['--model', str(trained_run), '--images', str(images), '--output', out]) == 2
    assert f'it holds a training run; export it to a model folder with `python hub/export.py {trained_run}' in \
        capsys.readouterr().err
    weights = next(trained_run.glob('*.safetensors'))
    assert predict_main(['--model', str(weights), '--images', str(images), '--output', out]) == 2
    assert f'{weights} is a file: give the exported folder that holds it' in capsys.readouterr().err


def test_an_export_with_cut_short_weights_or_config_is_refused_naming_the_file(exported, tmp_path):
    from dida_timm.models.factory import create_model
    broken = tmp_path / 'repo'
    shutil.copytree(exported, broken)
    weights = broken / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r'its weights \(model.safetensors\) cannot be read'):
        create_model(str(broken), pretrained=True)
    out = tmp_path / 'pred.csv'
    assert predict_main(['--model', str(broken), '--images', str(tmp_path), '--output', str(out)]) == 2
    shutil.copy(exported / 'model.safetensors', weights)
    (broken / 'config.json').write_text('{"architecture": "dida_digitnet_compact",')
    with pytest.raises(ValueError, match=f'{re.escape(str(broken / "config.json"))} is not valid JSON'):
        create_model(str(broken), pretrained=True)
