"""`create_model` for every model spec, with downloaded configs validated and pickled weights refused.

Training (train/train.py), prediction (`dida_timm.inference`) and the Hub checks all create models here. A spec is a
timm name with an optional tag (`dida_resnet18.tv_in1k`), `hf-hub:ORG/NAME[@REVISION]`, `local-dir:PATH`, or a
plain path to an exported repo folder (one holding config.json).

For `hf-hub:` and `local-dir:` specs the config.json that timm will read (same revision) is validated before any of
its values reaches a constructor, and the weights must be `model.safetensors` unless `allow_pickle=True`: timm
would otherwise fall back to a pickled `pytorch_model.bin` / `.pth`. `timm.create_model('hf-hub:...')` called
directly does neither check.
"""
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import timm
import torch
from safetensors import SafetensorError

from .dida_any import register_dida

__all__ = ['create_model', 'label_names', 'read_hub_config', 'require_safetensors', 'validate_hub_config']


# constructor arguments a downloaded config may not set: they would redirect what gets loaded
_FORBIDDEN_MODEL_ARGS = {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir',
                         'features_only', 'feature_cfg', 'device'}
_FORBIDDEN_CFG_KEYS = {'file', 'url', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source'}


def _is_plain(value, depth: int = 0) -> bool:
    """JSON scalars (finite numbers, short strings) and small lists / dicts of them."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 256
    if isinstance(value, list) and depth < 2:
        return len(value) <= 64 and all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 2:
        return len(value) <= 64 and all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def validate_hub_config(config: Dict, where: str) -> None:
    """Check a downloaded config.json before any of its values reach a model constructor.

    Raises:
        ValueError: naming `where` and the offending field.
    """
    def bad(field: str, why: str):
        raise ValueError(f'{where}: config.json field {field!r} {why}')

    if not isinstance(config, dict):
        bad('(root)', 'is not an object')
    arch = config.get('architecture')
    if not isinstance(arch, str) or not re.fullmatch(r'[A-Za-z0-9_]{1,128}', arch):
        bad('architecture', f'must be a model name, got {arch!r}')
    num_classes = config.get('num_classes', 0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 <= num_classes <= 1_000_000:
        bad('num_classes', f'must be an integer in [0, 1000000], got {num_classes!r}')
    model_args = config.get('model_args', {})
    if not isinstance(model_args, dict):
        bad('model_args', 'must be an object')
    for key, value in model_args.items():
        if key in _FORBIDDEN_MODEL_ARGS or not re.fullmatch(r'[a-z][a-z0-9_]{0,63}', key):
            bad(f'model_args.{key}', 'may not be set by a downloaded config')
        if not _is_plain(value):
            bad(f'model_args.{key}', f'must be plain JSON data, got {value!r:.80}')
    if 'pretrained_cfg' not in config:
        # timm parses such a legacy config by making every top-level key a pretrained_cfg key, unchecked here
        bad('pretrained_cfg', 'is missing (a legacy config, whose top-level keys timm would all read as '
                              'pretrained_cfg): re-export the model with hub/export.py')
    pretrained_cfg = config['pretrained_cfg']
    if not isinstance(pretrained_cfg, dict):
        bad('pretrained_cfg', 'must be an object')
    for key in _FORBIDDEN_CFG_KEYS & set(pretrained_cfg):
        bad(f'pretrained_cfg.{key}', 'may not be set by a downloaded config (it would redirect the weights)')
    if pretrained_cfg.get('custom_load'):
        bad('pretrained_cfg.custom_load', 'must be false: only plain state dicts are loaded')
    labels = config.get('label_names', [])
    if isinstance(labels, dict):  # timm's other form, {"0": name, ...}: every class id once, no other key
        if sorted(labels) != sorted(str(i) for i in range(len(labels))):
            bad('label_names', f'maps ids {sorted(labels)[:5]}...: an id -> name map needs the ids "0" to '
                               f'"{len(labels) - 1}", each once')
        labels = list(labels.values())
    if not isinstance(labels, list) or not all(isinstance(n, str) and len(n) <= 256 for n in labels):
        bad('label_names', 'must be a list of strings (or an id -> string map)')
    if labels and num_classes and len(labels) != num_classes:
        bad('label_names', f'names {len(labels)} classes, but num_classes is {num_classes}')


def _source(spec: str) -> Tuple[Optional[str], str]:
    """('hf-hub' | 'local-dir' | None, the rest of the spec)."""
    for source in ('hf-hub', 'local-dir'):
        if spec.startswith(f'{source}:'):
            return source, spec[len(source) + 1:]
    return None, spec


def _hf_download(location: str, filename: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    from huggingface_hub import hf_hub_download
    from timm.models._hub import hf_split
    repo_id, revision = hf_split(location)
    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))


def read_hub_config(spec: str, cache_dir: Optional[Union[str, Path]] = None) -> Optional[Dict]:
    """The config.json timm reads for a `local-dir:` or `hf-hub:` spec (the spec's own revision; a Hub repo's from
    `cache_dir` when given, the cache timm then reads); None otherwise."""
    source, location = _source(spec)
    if source == 'local-dir':
        path = Path(location) / 'config.json'
        if not path.is_file():
            hint = ''
            if (path.parent / 'args.yaml').is_file():  # what train.py writes into a run folder
                hint = (f': it holds a training run; export it to a model folder with `python hub/export.py '
                        f'{path.parent} --out DIR --repo-name ORG/NAME` and give DIR')
            raise FileNotFoundError(f'{spec}: no config.json in {path.parent}{hint}')
    elif source == 'hf-hub':
        path = _hf_download(location, 'config.json', cache_dir)
    else:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{spec}: {path} is not valid JSON ({e})') from e


def require_safetensors(spec: str, cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Refuse a `local-dir:` / `hf-hub:` spec whose weights timm would not read from model.safetensors (a Hub repo's
    looked up in `cache_dir` when given, the cache timm then loads from).

    Raises:
        ValueError: naming the spec, when it holds no model.safetensors.
        FileNotFoundError: naming the spec and the reason, when its model.safetensors could be neither downloaded
            nor found in the cache (offline, or the Hub unreachable): whether the repo has one is then unknown.
    """
    source, location = _source(spec)
    refusal = (f'{spec}: no model.safetensors, so timm would unpickle another weights file; refused by default '
               '(pass allow_pickle=True, or --allow-pickle, only for a source you trust)')
    if source == 'local-dir' and not (Path(location) / 'model.safetensors').is_file():
        raise ValueError(refusal)
    if source == 'hf-hub':
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
        try:
            _hf_download(location, 'model.safetensors', cache_dir)
        except LocalEntryNotFoundError as e:  # an EntryNotFoundError too, but says nothing of what the repo holds
            raise FileNotFoundError(f'{spec}: model.safetensors could not be downloaded or found in the cache '
                                    f'({e})') from e
        except EntryNotFoundError as e:  # the Hub answered: the repo has no such file
            raise ValueError(refusal) from e


def builtin_architectures() -> List[str]:
    """The architectures `import dida_timm` registers: those of the built-in families, not those `register_dida`
    adds at run time."""
    return timm.list_models(module=['dida_resnet', 'dida_digitnet', 'dida_generic'])


def create_model(spec: str, pretrained: bool = False, allow_pickle: bool = False, **kwargs) -> torch.nn.Module:
    """timm.create_model, with Hub / local configs validated first and a clear word on unknown architectures.

    A `dida_<base>` architecture that is not registered yet is registered with `register_dida` when `<base>` is a
    timm model, so runs and exports of any timm CNN rebuild by name.

    Args:
        spec: name[.tag], hf-hub:ORG/NAME[@REVISION], local-dir:PATH, or the path of an exported repo folder.
        pretrained: Load the weights the spec names.
        allow_pickle: Let a downloaded or local repo without model.safetensors load pickled weights.
        **kwargs: Passed to timm.create_model; a `cache_dir` among them is where the Hub checks read too.
    """
    if Path(spec).is_dir():
        spec = f'local-dir:{Path(spec).resolve()}'
    elif Path(spec).is_file():
        raise ValueError(f'{spec} is a file: give the exported folder that holds it and its config.json, or load the '
                         f"weights into an architecture with pretrained_cfg_overlay=dict(file='{spec}')")
    # checked where timm will read: another cache may hold other files than the default one
    cache_dir = kwargs.get('cache_dir')
    config = read_hub_config(spec, cache_dir)
    if config is not None:
        validate_hub_config(config, spec)
        if pretrained and not allow_pickle:
            require_safetensors(spec, cache_dir)
    arch = config['architecture'] if config is not None else spec.split('.')[0]
    if arch.startswith('dida_') and not timm.is_model(arch) and timm.is_model(arch[len('dida_'):]):
        register_dida(arch[len('dida_'):])
    try:
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except SafetensorError as e:  # a copy or download cut short: timm's error names neither the spec nor the file
        raise ValueError(f'{spec}: its weights (model.safetensors) cannot be read: {e}') from e
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            known = builtin_architectures()
            raise RuntimeError(
                f'{spec}: {e}. dida-timm architectures are registered by `import dida_timm`, which must come '
                f'before timm.create_model; this install registers {known}') from e
        raise


def label_names(model: torch.nn.Module) -> List[str]:
    """The name of each class index: the config's `label_names`, a list or timm's id -> name map, else the index.

    Raises:
        ValueError: when the names do not name each of the model's classes once.
    """
    names = model.pretrained_cfg.get('label_names')
    if not names:
        return [str(i) for i in range(model.num_classes)]
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(len(names))]
    if len(names) != model.num_classes or any(n is None for n in names):
        raise ValueError(f"the model's label_names {list(names)[:5]}... do not name its {model.num_classes} classes "
                         'each once (a list in class order, or ids 0 to num_classes - 1)')
    return [str(n) for n in names]
