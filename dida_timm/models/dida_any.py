"""`register_dida`: any timm CNN with a DIDA branch as a timm model name, registered at run time.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

`add_dida` changes a model instance; a saved adapted model must also be rebuilt from a name, as timm rebuilds every
model (`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`, hub exports). The models
registered here are built exactly as the families of dida_generic.py (same weights loading, same tags), but live
in this module so that the fixed list of the package's models does not change with what a session registers.
"""
from typing import Any, Dict

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, model_entrypoint, register_model

from .dida_generic import create_dida, dida_cfgs

__all__ = ['register_dida']

# filled by register_dida; timm's register_model reads the module's default_cfgs
default_cfgs: Dict[str, Any] = {}


def register_dida(base: str) -> str:
    """Make `dida_<base>` a timm model name for any timm CNN `add_dida` handles, like the
    families of dida_generic.py.

    The name then works everywhere timm takes one: `timm.create_model(name, pretrained=True)` loads the base's
    ImageNet weights (strict, fresh branch), `pretrained_cfg_overlay=dict(file=...)` a saved DIDA or static-twin
    state dict, and the `.untrained` tag builds it without weights. Registering a name twice returns it unchanged.

    Args:
        base: A timm model name without tag (e.g. 'regnetx_002').

    Returns:
        The registered name, 'dida_<base>'.

    Raises:
        ValueError: for a name timm does not know, one with a tag, or a DIDA model; and for a base whose `dida_` name
            is already another layout (the DIDA-ResNets: the released code's branch, not `add_dida`'s one unit).
    """
    if base.startswith('dida_') or '.' in base or not timm.is_model(base):
        raise ValueError(f'register_dida needs a timm model name without tag, not a DIDA model; got {base!r}')
    name = f'dida_{base}'
    if timm.is_model(name):
        if model_entrypoint(name).__module__ not in (__name__, create_dida.__module__):
            raise ValueError(
                f"{name} is already a model of its own (built in {model_entrypoint(name).__module__}), whose "
                f"branch differs from add_dida's: a state dict of add_dida(timm.create_model('{base}')) does not "
                f"load into it. Rebuild that model with add_dida, or use {name} from the start")
        return name

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_dida(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"timm's {base} with a one-unit DIDA branch beside its last feature stage."
    default_cfgs.update(generate_default_cfgs(dida_cfgs(base)))
    return register_model(entrypoint).__name__
