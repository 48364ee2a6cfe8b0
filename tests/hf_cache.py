"""Build a local Hugging Face cache of timm checkpoints, so tests load weights through timm's real hub path.

The files are what `huggingface_hub` itself would have cached after a download (`models--ORG--NAME` with
`refs/main` and a snapshot), holding freshly initialised weights of the named timm architecture; the tests
then run with `HF_HUB_OFFLINE=1` against this cache.
"""
import hashlib
import json
from pathlib import Path
from typing import Iterable

import safetensors.torch
import timm
import torch


def cache_repo_dir(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ('models--' + repo_id.replace('/', '--'))


def add_snapshot(cache_dir: Path, repo_id: str, files: dict, revision: str = 'main') -> Path:
    """Write `files` ({name: bytes}) as the `revision` snapshot of `repo_id` in a hub cache; returns the snapshot."""
    commit = hashlib.sha1(f'{repo_id}@{revision}'.encode() if revision != 'main' else repo_id.encode()).hexdigest()
    repo_dir = cache_repo_dir(cache_dir, repo_id)
    snapshot = repo_dir / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / revision).write_text(commit)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def add_timm_checkpoint(cache_dir: Path, model_tag: str, seed: int = 0) -> Path:
    """Cache `timm/<model_tag>` (e.g. 'resnet18.tv_in1k') with seeded random weights of that architecture."""
    arch = model_tag.split('.')[0]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    config = dict(architecture=arch, num_classes=model.num_classes, pretrained_cfg=dict(
        {k: v for k, v in model.pretrained_cfg.items() if k not in ('architecture', 'tag')}))
    return add_snapshot(cache_dir, f'timm/{model_tag}', {
        'model.safetensors': weights,
        'config.json': json.dumps(config).encode(),
    })


def build_backbone_cache(cache_dir: Path, model_names: Iterable[str]) -> None:
    """Cache the ImageNet checkpoint every hub-loaded pretrained tag of `model_names` loads (its `hf_hub_id`)."""
    for name in model_names:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.file:  # weights that ship with the package need no cache
            continue
        hub_id = cfg.hf_hub_id or ''
        if not hub_id.startswith('timm/'):
            raise ValueError(f'{name} loads {hub_id}, which this builder cannot make')
        if not cache_repo_dir(cache_dir, hub_id).exists():
            add_timm_checkpoint(cache_dir, hub_id[len('timm/'):])
