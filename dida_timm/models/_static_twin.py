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

from dida_timm.layers import DidaStage, is_branch_parameter

__all__ = ['static_twin_filter_fn']


def classifier_name(model: nn.Module) -> str:
    """Module name of the classifier (not every timm model's `get_classifier` takes `name_only`)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def static_twin_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a static twin's state dict to `model`, or pass a DIDA one (or any, for a model without branch) through.

    Every static key must match the model exactly (the classifier excepted, which timm adapts to a new class count
    when loading pretrained weights); the branch keeps the model's fresh initialisation.

    Raises:
        RuntimeError: naming the keys that are missing or unexpected.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    stages = tuple(f'{name}.' for name, m in model.named_modules() if isinstance(m, DidaStage))
    if not stages or any(is_branch_parameter(k) for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        stage = next((s for s in stages if k.startswith(s)), None)
        out[f'{stage}blocks.{k[len(stage):]}' if stage else k] = v
    model_state = model.state_dict()
    classifier = classifier_name(model) + '.'
    static_keys = {k for k in model_state if not is_branch_parameter(k) and not k.startswith(classifier)}
    loaded_keys = {k for k in out if not k.startswith(classifier)}
    missing, unexpected = sorted(static_keys - loaded_keys), sorted(loaded_keys - static_keys)
    if missing or unexpected:
        raise RuntimeError(
            f'Weights do not match the static network inside this {type(model).__name__}: '
            f'missing {missing[:8]}{" ..." if len(missing) > 8 else ""}, '
            f'unexpected {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}.'
        )
    out.update({k: v for k, v in model_state.items() if is_branch_parameter(k)})
    return out
