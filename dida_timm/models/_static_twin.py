"""Load the weights of a DIDA model's static twin (the same network without the branch) into the DIDA model.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

A DIDA model wraps each module that gets a branch in a `DidaStage`, so that module's keys gain a `blocks.`
(`layer4.0.conv1.weight` -> `layer4.blocks.0.conv1.weight`). Mapping the twin's keys lets a DIDA model start from
ImageNet weights (the paper's recipe) or from any trained static twin, e.g. a source-only model, with the branch
initialised fresh.
"""
from typing import Dict

import torch
import torch.nn as nn

from dida_timm.layers import DidaStage, is_branch_parameter, static_keys_to_blocks

__all__ = ['static_twin_filter_fn']


def classifier_name(model: nn.Module) -> str:
    """Module name of the classifier (not every timm model's `get_classifier` takes `name_only`)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def static_twin_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a static twin's state dict to `model`, or check a DIDA one (or pass any, for a model without branch).

    Every key must match the model exactly, the classifier excepted (timm adapts it to a new class count, and then
    loads the rest without its strict check, so this check is the only one): a static twin's static keys, the
    branch keeping the model's fresh initialisation; a DIDA state dict's keys, branch included.

    Raises:
        RuntimeError: naming the keys that are missing or unexpected.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    stages = {f'{name}.': m for name, m in model.named_modules() if isinstance(m, DidaStage)}
    if not stages:
        return state_dict
    twin = not any(is_branch_parameter(k) for k in state_dict)
    out = dict(state_dict)
    if twin:
        for prefix, stage in stages.items():
            static_keys_to_blocks(stage, out, prefix)
    model_state = model.state_dict()
    classifier = classifier_name(model) + '.'
    expected = {k for k in model_state if not k.startswith(classifier) and not (twin and is_branch_parameter(k))}
    loaded_keys = {k for k in out if not k.startswith(classifier)}
    # torch's batch norm fills in a missing counter on load (checkpoints before its version 2 have none), as timm's
    # strict load into the static twin does
    missing = sorted(k for k in expected - loaded_keys if not k.endswith('.num_batches_tracked'))
    unexpected = sorted(loaded_keys - expected)
    if missing or unexpected:
        hint = ''
        if any(k.endswith('.paths_weight') for k in unexpected):
            hint = (' They hold inference forms of DIDA units (timm\'s reparameterize_model): load the trained '
                    'weights, then reparameterize.')
        raise RuntimeError(
            f'Weights do not match the {"static network inside this" if twin else "network of this"} '
            f'{type(model).__name__}: missing {missing[:8]}{" ..." if len(missing) > 8 else ""}, '
            f'unexpected {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}.{hint}'
        )
    if twin:
        out.update({k: v for k, v in model_state.items() if is_branch_parameter(k)})
    return out
