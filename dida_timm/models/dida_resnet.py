"""DIDA-ResNet: ResNets with a dynamic instance adaptation branch.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028
(Deng, Zhou, Li, He, Song, Xiang; IEEE T-IP 2022).

The static ResNet (timm's `ResNet`, unchanged) is f_c (stem + layer1..3) and f_s (layer4). A DIDA branch
reads layer3's output and is added to layer4's: Z = layer4(X3) + branch(X3) (paper Fig. 2).

Follows the authors' released code rather than the paper text where they differ:
* the branch has one unit per residual block of layer4 (2 for ResNet-18/34, 3 for ResNet-50/101/152);
  `branch_depth=1` gives the single module of the paper's text;
* bottleneck nets project each unit's 512 channels to 2048 with 1x1 conv -> BN -> ReLU.
The released code's unused downsample in the branch is not reproduced (dead parameters break DDP).
Branches can be placed at other or several stages (`dida_stages`, paper Table VII).

Pretrained tags load timm's ImageNet ResNet weights into the static network with strict key checks and
initialise the branch fresh; the branch trains from scratch in the paper's recipe.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from dida_timm.layers import DidaBranch, DidaStage, is_branch_parameter

from ._static_twin import static_twin_filter_fn

__all__ = ['DidaResNet']

_STAGE_NAMES = ('layer1', 'layer2', 'layer3', 'layer4')


class DidaResNet(ResNet):
    """timm ResNet with DIDA branches beside one or more stages.

    Args:
        block: Residual block class, BasicBlock or Bottleneck.
        layers: Number of blocks per stage.
        dida_stages: Stages (1..4) that get a DIDA branch; (4,) is the paper's res4 placement.
        branch_depth: Units per branch; None gives one unit per residual block of the stage (released code).
        dida_reduction: Channel reduction m of the DIDA modules.
        dida_dilations: Dilations of the DIDA modules (one or two).
        dida_kernel_size: Generated kernel size, or one per dilation.
        dida_shared_reduction: Share the reduction conv between features and kernel generators.
        dida_dynamic: Per-sample kernels (True) or the static-kernel ablation (False).
        dida_layer_scale: Initial value of a learned per-channel scale on the branch output (None: no scale).
        **kwargs: Passed to timm's ResNet (num_classes, in_chans, output_stride, global_pool, ...).
    """

    def __init__(
            self,
            block: Union[BasicBlock, Bottleneck],
            layers: Tuple[int, ...],
            dida_stages: Sequence[int] = (4,),
            branch_depth: Optional[int] = None,
            dida_reduction: int = 16,
            dida_dilations: Sequence[int] = (1, 2),
            dida_kernel_size: Union[int, Sequence[int]] = 3,
            dida_shared_reduction: bool = True,
            dida_dynamic: bool = True,
            dida_layer_scale: Optional[float] = None,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        super().__init__(block, layers, device=device, dtype=dtype, **kwargs)
        dida_stages = tuple(sorted(set(dida_stages)))
        if not dida_stages or any(s not in (1, 2, 3, 4) for s in dida_stages):
            raise ValueError(f'dida_stages must be a non-empty subset of (1, 2, 3, 4), got {dida_stages!r}')
        self.dida_stages = dida_stages
        norm_layer = get_norm_layer(kwargs.get('norm_layer', nn.BatchNorm2d))
        act_layer = get_act_layer(kwargs.get('act_layer', nn.ReLU))
        channels = kwargs.get('channels', (64, 128, 256, 512))
        for s in dida_stages:
            stage_in, stage_out = self.feature_info[s - 1], self.feature_info[s]
            # the stem's feature is taken before max-pooling, so stage 1 always runs at stride 1
            in_reduction = 4 if s == 1 else stage_in['reduction']
            branch = DidaBranch(
                stage_in['num_chs'],
                channels[s - 1],
                stage_out['num_chs'],
                depth=branch_depth or layers[s - 1],
                stride=stage_out['reduction'] // in_reduction,
                reduction=dida_reduction,
                dilations=dida_dilations,
                kernel_size=dida_kernel_size,
                shared_reduction=dida_shared_reduction,
                dynamic=dida_dynamic,
                layer_scale_init=dida_layer_scale,
                norm_layer=norm_layer,
                act_layer=act_layer,
                device=device,
                dtype=dtype,
            )
            name = _STAGE_NAMES[s - 1]
            setattr(self, name, DidaStage(getattr(self, name), branch))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups: stem, then per stage (or per block), each branch after its stage's blocks."""
        if coarse:
            return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)')
        return dict(
            stem=r'^conv1|bn1|maxpool',
            blocks=[
                (r'^layer(\d+)\.blocks\.(\d+)', None),
                (r'^layer(\d+)\.(\d+)', None),
                # ordinal suffix sorts the branch after any block index of its stage (99999 would merge groups)
                (r'^layer(\d+)\.branch', (1000,)),
            ],
        )

    @torch.jit.ignore
    def branch_parameters(self) -> List[nn.Parameter]:
        """Parameters of the DIDA branches (trained from scratch, at the head's learning rate)."""
        return [p for n, p in self.named_parameters() if is_branch_parameter(n)]

    def _stages(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (stage outputs include their DIDA branch).

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Unused (ResNets have no final norm), kept for the timm API.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.

        Returns:
            Final features and the list of intermediates, or only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(5, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the stem and the four stages (with their DIDA branches)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self._stages():
                x = checkpoint(stage, x)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x


def _create_dida_resnet(variant: str, pretrained: bool = False, **kwargs) -> DidaResNet:
    return build_model_with_cfg(
        DidaResNet,
        variant,
        pretrained,
        pretrained_filter_fn=static_twin_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2203.05028',
        **kwargs,
    }


def _backbone_cfg(backbone: str) -> Dict[str, Any]:
    """Tag that loads an existing timm ImageNet ResNet checkpoint (`resnetX.tag`) into the static network."""
    cfg = get_pretrained_cfg(backbone).to_dict()
    for k in ('architecture', 'tag', 'url', 'paper_ids', 'origin_url'):
        cfg.pop(k, None)
    return _cfg(**cfg, notes=(f'static network from timm/{backbone}, DIDA branch initialised fresh',))


# the default tag is `untrained` (ImageNet weights are asked for by their tag, like every adapted checkpoint).
# timm makes the first tag WITH weights the default; a `*` tag placed after them overrides it.
default_cfgs = generate_default_cfgs({
    f'dida_resnet{depth}.{tag}': _backbone_cfg(f'resnet{depth}.{tag}') if tag != 'untrained*' else _cfg()
    for depth in (18, 34, 50, 101, 152)
    for tag in ('tv_in1k', 'a1_in1k', 'untrained*')
})


@register_model
def dida_resnet18(pretrained: bool = False, **kwargs) -> DidaResNet:
    """DIDA-ResNet-18: ResNet-18 with a two-unit DIDA branch beside layer4 (paper's PACS backbone)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_dida_resnet('dida_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def dida_resnet34(pretrained: bool = False, **kwargs) -> DidaResNet:
    """DIDA-ResNet-34: ResNet-34 with a three-unit DIDA branch beside layer4."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_dida_resnet('dida_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def dida_resnet50(pretrained: bool = False, **kwargs) -> DidaResNet:
    """DIDA-ResNet-50: ResNet-50 with a three-unit DIDA branch beside layer4 (Office-Home backbone)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_dida_resnet('dida_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def dida_resnet101(pretrained: bool = False, **kwargs) -> DidaResNet:
    """DIDA-ResNet-101: ResNet-101 with a three-unit DIDA branch beside layer4 (DomainNet backbone)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_dida_resnet('dida_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def dida_resnet152(pretrained: bool = False, **kwargs) -> DidaResNet:
    """DIDA-ResNet-152: ResNet-152 with a three-unit DIDA branch beside layer4."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_dida_resnet('dida_resnet152', pretrained, **dict(model_args, **kwargs))
