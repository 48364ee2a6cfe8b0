"""DIDA digit networks: the Digit-Five CNN of M3SDA with a DIDA branch beside its last conv.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028
Base network: `Moment Matching for Multi-Source Domain Adaptation` (Peng et al., ICCV 2019),
https://arxiv.org/abs/1812.01754 - the 32x32 digit CNN DIDA-Net uses on Digit-Five.

conv5x5 3->64, BN, ReLU, maxpool 3/2/1; conv5x5 64->64, BN, ReLU, maxpool; conv5x5 64->128, BN, ReLU (f_s).
A DIDA module 64 -> 128 (m = 16, 3x3, dilations 1 and 2) -> BN -> ReLU runs beside the last conv and the two
are summed on 8x8 maps (`dida_blocks` and `branch_depth` build the placement and depth ablations). Head:
flatten 8192 -> fc 3072, BN1d, ReLU, dropout 0.5 -> fc 2048, BN1d, ReLU -> classifier.

`digitnet` is the static twin (the same network without the branch). The `_compact` variants (32-64-128
convs, the 8x8 map average-pooled to 4x4, fc 256 -> 128) keep checkpoints at a few MB for published
checkpoints and CPU demos; that size is ours, not the paper's.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from dida_timm.layers import DidaBranch, DidaStage

from ._published import published_folder
from ._static_twin import static_twin_filter_fn

__all__ = ['DigitNet']


class ConvBlock(nn.Sequential):
    """5x5 conv -> BN -> ReLU (-> 3x3 / 2 max-pool)."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        layers = [
            ('conv', nn.Conv2d(in_chs, out_chs, 5, padding=2, bias=False, **dd)),
            ('bn', nn.BatchNorm2d(out_chs, **dd)),
            ('act', nn.ReLU(inplace=True)),
        ]
        if pool:
            layers.append(('pool', nn.MaxPool2d(3, stride=2, padding=1)))
        super().__init__(OrderedDict(layers))


class DigitHead(nn.Module):
    """Pool -> flatten -> (fc -> BN1d -> ReLU, dropout after the first) per hidden size -> classifier.

    Args:
        in_chs: Channels of the feature map.
        feat_size: Spatial size of the feature map.
        hidden_dims: Widths of the hidden fc layers.
        num_classes: Classes of the classifier, 0 for none.
        pool_type: 'flatten' (average-pool to `flatten_size`, then flatten), 'avg', or '' (no pooling and no
            hidden layers: the classifier, if any, is a 1x1 conv giving per-location logits).
        flatten_size: Spatial size kept by 'flatten'.
        drop_rate: Dropout after the first hidden layer.
    """

    def __init__(
            self,
            in_chs: int,
            hidden_dims: Sequence[int],
            num_classes: int,
            pool_type: str = 'flatten',
            flatten_size: int = 8,
            drop_rate: float = 0.5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if pool_type not in ('flatten', 'avg', ''):
            raise ValueError(f"global_pool must be 'flatten', 'avg' or '', got {pool_type!r}")
        self.pool_type = pool_type
        self.flatten_size = flatten_size if pool_type == 'flatten' else 1
        self.drop_rate = drop_rate
        layers = []
        if pool_type:
            dims = [in_chs * self.flatten_size ** 2, *hidden_dims]
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
                layers += [nn.Linear(d_in, d_out, **dd), nn.BatchNorm1d(d_out, **dd), nn.ReLU(inplace=True)]
                if i == 0:
                    layers.append(nn.Dropout(drop_rate))
        self.pre_logits = nn.Sequential(*layers)
        self.hidden_size = hidden_dims[-1] if pool_type else in_chs
        self.fc = self._classifier(num_classes, **dd)

    def _classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        if not self.pool_type:
            return nn.Conv2d(self.hidden_size, num_classes, 1, device=device, dtype=dtype)
        return nn.Linear(self.hidden_size, num_classes, device=device, dtype=dtype)

    def reset(self, num_classes: int, device=None, dtype=None) -> None:
        self.fc = self._classifier(num_classes, device=device, dtype=dtype)
        self.fc.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type:
            x = self.pre_logits(F.adaptive_avg_pool2d(x, self.flatten_size).flatten(1))
        return x if pre_logits else self.fc(x)


class DigitNet(nn.Module):
    """Digit-Five CNN (M3SDA) with an optional DIDA branch beside its last conv (or beside conv2, an ablation).

    Args:
        num_classes: Number of classes.
        in_chans: Input channels.
        widths: Output channels of the three 5x5 convs.
        hidden_dims: Widths of the head's hidden fc layers.
        flatten_size: The head average-pools the feature map to this size (8: no-op at 32 px), then flattens.
        global_pool: 'flatten' (paper), 'avg', or '' (return the feature map).
        drop_rate: Dropout in the head.
        dida: Add the DIDA branch (False gives the static twin).
        dida_blocks: Conv blocks (2, 3) that get a branch beside them; (3,) is DIDA-Net's. Block 1 reads the
            RGB image, which has too few channels to reduce by m.
        branch_depth: DIDA units per branch (DIDA module -> BN -> ReLU each).
        dida_reduction: Channel reduction m of the DIDA module.
        dida_dilations: Dilations of the DIDA module.
        dida_kernel_size: Generated kernel size, or one per dilation.
        dida_shared_reduction: Share the reduction conv between features and kernel generators.
        dida_dynamic: Per-sample kernels (True) or the static-kernel ablation (False).
        dida_layer_scale: Initial value of a learned per-channel scale on the branch output (None: no scale).
    """

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            widths: Tuple[int, int, int] = (64, 64, 128),
            hidden_dims: Sequence[int] = (3072, 2048),
            flatten_size: int = 8,
            global_pool: str = 'flatten',
            drop_rate: float = 0.5,
            dida: bool = True,
            dida_blocks: Sequence[int] = (3,),
            branch_depth: int = 1,
            dida_reduction: int = 16,
            dida_dilations: Sequence[int] = (1, 2),
            dida_kernel_size: Union[int, Sequence[int]] = 3,
            dida_shared_reduction: bool = True,
            dida_dynamic: bool = True,
            dida_layer_scale: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.hidden_dims = tuple(hidden_dims)
        self.flatten_size = flatten_size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        dida_blocks = tuple(sorted(set(dida_blocks)))
        if not dida_blocks or any(b not in (2, 3) for b in dida_blocks):
            raise ValueError(f'dida_blocks must be a non-empty subset of (2, 3), got {dida_blocks!r}')
        self.block1 = ConvBlock(in_chans, widths[0], pool=True, **dd)
        for i, (in_chs, out_chs, pool) in enumerate(((widths[0], widths[1], True), (widths[1], widths[2], False)), 2):
            block = ConvBlock(in_chs, out_chs, pool=pool, **dd)
            if dida and i in dida_blocks:
                branch = DidaBranch(
                    in_chs, out_chs, out_chs,
                    depth=branch_depth,
                    stride=2 if pool else 1,
                    reduction=dida_reduction,
                    dilations=dida_dilations,
                    kernel_size=dida_kernel_size,
                    shared_reduction=dida_shared_reduction,
                    dynamic=dida_dynamic,
                    layer_scale_init=dida_layer_scale,
                    **dd,
                )
                block = DidaStage(block, branch)
            setattr(self, f'block{i}', block)
        self.num_features = widths[2]
        self.feature_info = [
            dict(num_chs=widths[0], reduction=2, module='block1'),
            dict(num_chs=widths[1], reduction=4, module='block2'),
            dict(num_chs=widths[2], reduction=4, module='block3'),
        ]
        self.head = self._make_head(global_pool, num_classes, **dd)
        self.head_hidden_size = self.head.hidden_size

    def _make_head(self, global_pool: str, num_classes: int, device=None, dtype=None) -> DigitHead:
        return DigitHead(
            self.num_features, self.hidden_dims, num_classes, global_pool, self.flatten_size, self.drop_rate,
            device=device, dtype=dtype,
        )

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^block1', blocks=r'^block(\d+)' if coarse else [
            (r'^block(\d+)\.blocks', None), (r'^block(\d+)\.branch', (1,)), (r'^block(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'head.fc' if name_only else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; a new `global_pool` rebuilds the whole head (its hidden layers included)."""
        self.num_classes = num_classes
        if global_pool is None or global_pool == self.head.pool_type:
            self.head.reset(num_classes, **get_device_dtype(self.block1))
        else:
            self.head = self._make_head(global_pool, num_classes, **get_device_dtype(self.block1))
            self.head.train(self.training)
        self.head_hidden_size = self.head.hidden_size

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns the outputs of the three conv blocks (the last with its branch).

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Unused (no final norm), kept for the timm API.
            stop_early: Stop after the last requested block.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(3, indices)
        blocks = [self.block1, self.block2, self.block3]
        if stop_early:
            blocks = blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq([block], x)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last requested intermediate (and the head)."""
        take_indices, max_index = feature_take_indices(3, indices)
        for name in ('block1', 'block2', 'block3')[max_index + 1:]:
            setattr(self, name, nn.Sequential())
        if max_index < 2:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 2:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.block1, self.block2, self.block3], x)
        return self.block3(self.block2(self.block1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DigitNet) -> Dict[str, torch.Tensor]:
    """`static_twin_filter_fn`, and for a model built with `global_pool=''` (no pooling, no hidden layers) the
    checkpoint's pooled head left out: its hidden layers have no place in the model, and its classifier, which reads
    their output, none either (a new class count gets a new per-location classifier, as timm gives any model).

    Raises:
        RuntimeError: where the checkpoint's head cannot serve the model's: its classifier for the same class count
            without hidden layers, or hidden layers fed by another pooling.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    if model.head.pool_type:
        model_state = model.state_dict()
        resized = [k for k, v in state_dict.items()
                   if k.startswith('head.pre_logits.') and k in model_state and v.shape != model_state[k].shape]
        if resized:
            raise RuntimeError(
                f"global_pool={model.head.pool_type!r} gives the head's hidden layers other inputs than the "
                f"checkpoint's ({resized[0]}: {tuple(state_dict[resized[0]].shape)} in the checkpoint, "
                f"{tuple(model_state[resized[0]].shape)} here): keep the checkpoint's global_pool, or pass "
                "global_pool='' and num_classes=0 for the feature map")
        return static_twin_filter_fn(state_dict, model)
    classifier = state_dict.get('head.fc.weight')
    if model.num_classes and classifier is not None and classifier.shape[0] == model.num_classes:
        raise RuntimeError(
            f"global_pool='' builds a head without the checkpoint's hidden layers, so its {model.num_classes}-class "
            "classifier, which reads them, cannot be loaded: pass num_classes=0 for the feature map, or another "
            "num_classes for a new per-location classifier")
    return static_twin_filter_fn({k: v for k, v in state_dict.items() if not k.startswith('head.')}, model)


def _create_digitnet(variant: str, pretrained: bool = False, **kwargs) -> DigitNet:
    return build_model_with_cfg(
        DigitNet, variant, pretrained, pretrained_filter_fn=_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'block1.conv', 'classifier': 'head.fc', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2203.05028', **kwargs,
    }


# adapted to each domain of the offline digits benchmark (the other four as sources), see hub/checkpoints/
OFFLINE_TARGETS = ('mnist', 'mnistm_style', 'syn_style', 'svhn_style', 'uci_digits')


def _published_cfgs():
    cfgs = {}
    for target in OFFLINE_TARGETS:
        name = f'dida_digitnet_compact.offline_{target}'
        folder = published_folder(name)
        if folder is not None:  # register no tag whose weights are not installed
            # squash, as their config.json says: they were evaluated on whole images resized to 32 x 32, where timm's
            # default centre crop would cut the sides of a non-square image
            cfgs[name] = _cfg(file=str(folder / 'model.safetensors'), crop_mode='squash',
                              # not 'adapted to': offline_uci_digits ships its source-only model, as its card says
                              notes=(f'for offline_digits/{target} as the target; card: {folder / "README.md"}',))
    return cfgs


# the default tag is `untrained`: `pretrained=True` without a tag must never silently load weights adapted to
# some target domain. timm makes the first tag WITH weights the default; a `*` tag placed after them overrides it.
default_cfgs = generate_default_cfgs({
    **_published_cfgs(),
    'dida_digitnet.untrained*': _cfg(),
    'digitnet.untrained*': _cfg(),
    'dida_digitnet_compact.untrained*': _cfg(),
    'digitnet_compact.untrained*': _cfg(),
})

_COMPACT = dict(widths=(32, 64, 128), hidden_dims=(256, 128), flatten_size=4)


@register_model
def dida_digitnet(pretrained: bool = False, **kwargs) -> DigitNet:
    """M3SDA Digit-Five CNN with a DIDA branch beside conv3 (DIDA-Net's Digit-Five network)."""
    return _create_digitnet('dida_digitnet', pretrained, **dict(dict(dida=True), **kwargs))


@register_model
def digitnet(pretrained: bool = False, **kwargs) -> DigitNet:
    """M3SDA Digit-Five CNN, the static twin of `dida_digitnet`."""
    return _create_digitnet('digitnet', pretrained, **dict(dict(dida=False), **kwargs))


@register_model
def dida_digitnet_compact(pretrained: bool = False, **kwargs) -> DigitNet:
    """Compact digit CNN (32-64-128 convs, fc 256-128) with a DIDA branch; checkpoints of ~3 MB."""
    return _create_digitnet('dida_digitnet_compact', pretrained, **dict(dict(_COMPACT, dida=True), **kwargs))


@register_model
def digitnet_compact(pretrained: bool = False, **kwargs) -> DigitNet:
    """Compact digit CNN, the static twin of `dida_digitnet_compact`."""
    return _create_digitnet('digitnet_compact', pretrained, **dict(dict(_COMPACT, dida=False), **kwargs))
