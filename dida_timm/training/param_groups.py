"""Parameter groups for DIDA-Net: the DIDA branch and the classifier learn faster than the backbone.

The paper trains the branch (from scratch) and the classifier at 10x the learning rate of the pretrained
backbone. Groups carry timm's `lr_scale`, which timm's schedulers apply on every update.
"""
from typing import Dict, List

import torch.nn as nn

from ..layers import is_branch_parameter
from ..models._static_twin import classifier_name

__all__ = ['uda_param_groups']


def uda_param_groups(model: nn.Module, new_lr_scale: float = 10.0, weight_decay: float = 5e-4) -> List[Dict]:
    """Split parameters into (backbone | branch + classifier) x (decayed | not decayed) groups.

    Args:
        model: A timm classifier; DIDA branch parameters are those under a `.branch.` module.
        new_lr_scale: Learning-rate multiplier of the branch and the classifier.
        weight_decay: Weight decay of weights; biases and norm parameters (1-D) get none, as in timm.
    """
    classifier = classifier_name(model) + '.' if hasattr(model, 'get_classifier') else None
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = is_branch_parameter(name) or (classifier is not None and name.startswith(classifier))
        decay = param.ndim > 1
        key = (new, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0,
                               lr_scale=new_lr_scale if new else 1.0)
        groups[key]['params'].append(param)
    return [groups[k] for k in sorted(groups)]
