"""The DIDA branch: a stack of DIDA units added in parallel to a static stage.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

DIDA-Net keeps the static network and adds a light dynamic branch beside one of its stages:
Z = stage(X) + branch(X). In the authors' released code the branch has one unit per residual block of the
stage it accompanies; a unit is DIDA module -> BN -> ReLU, followed by 1x1 conv -> BN -> ReLU when the stage
widens its output (bottleneck ResNets). The branch has no shortcut. The paper's text describes a single
unit (`depth=1`). An optional per-channel LayerScale (timm's `LayerScale2d`) on the branch output lets a network
start close to its static twin (not in the paper; an initialisation study of ours, docs/RESULTS.md).

Putting the static blocks and the branch inside one `DidaStage` module means every way timm has of reading a
stage's output (forward hooks, the flattened feature list, FX node names, `forward_intermediates`) sees the
sum, never the branch-less blocks.
"""
import copy
from collections import OrderedDict
from typing import Any, Iterator, Optional, Type

import torch
import torch.nn as nn
from timm.layers import LayerScale2d, create_act_layer
from timm.models._manipulate import checkpoint
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .dida import DidaModule

__all__ = ['DidaBranch', 'DidaStage', 'is_branch_parameter', 'muted_if_untrained', 'static_keys_to_blocks']


class DidaBranch(nn.Sequential):
    """Units of DIDA module -> norm -> act (-> 1x1 conv -> norm -> act when `out_chs` != `hidden_chs`).

    Args:
        in_chs: Channels of the stage input.
        hidden_chs: Output channels P of each DIDA module.
        out_chs: Channels of the stage output the branch is added to.
        depth: Number of units.
        stride: Stride of the first unit (the stage's stride).
        norm_layer: Normalization layer, called with the channel count (BatchNorm2d, LayerNorm2d, ...).
        act_layer: Activation layer, in place when it takes `inplace` (GELU does not).
        layer_scale_init: If set, the branch output is multiplied by a learned per-channel scale starting at
            this value (a small value makes the network start as its static twin). A BN with zero weight
            before the ReLU would do that too but kills the branch's gradients for good.
        **dida_kwargs: DidaModule options (reduction, dilations, kernel_size, shared_reduction, dynamic).
    """

    def __init__(
            self,
            in_chs: int,
            hidden_chs: int,
            out_chs: int,
            depth: int = 1,
            stride: int = 1,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            layer_scale_init: Optional[float] = None,
            device=None,
            dtype=None,
            **dida_kwargs: Any,
    ):
        dd = {'device': device, 'dtype': dtype}
        if depth < 1:
            raise ValueError(f'DidaBranch depth must be >= 1, got {depth}')
        units = []
        for i in range(depth):
            layers = OrderedDict(
                dida=DidaModule(
                    in_chs if i == 0 else out_chs,
                    hidden_chs,
                    stride=stride if i == 0 else 1,
                    **dida_kwargs,
                    **dd,
                ),
                bn=norm_layer(hidden_chs, **dd),
                act=create_act_layer(act_layer, inplace=True),
            )
            if out_chs != hidden_chs:
                layers.update(
                    conv=nn.Conv2d(hidden_chs, out_chs, 1, bias=False, **dd),
                    bn2=norm_layer(out_chs, **dd),
                    act2=create_act_layer(act_layer, inplace=True),
                )
            if i == depth - 1 and layer_scale_init is not None:
                layers.update(scale=LayerScale2d(out_chs, layer_scale_init, **dd))
            units.append(nn.Sequential(layers))
        super().__init__(*units)
        _init_branch_weights(self)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the inference form, in place: every DIDA module's (`DidaModule.reparameterize`), and each batch
        norm folded into the conv before it, with its running statistics (the function of the branch in eval mode).

        timm's `reparameterize_model(model)` calls it on every branch inside `model`; a branch that is itself the
        model given to timm is not reached by that walk: call this instead.
        """
        for unit in self:
            unit.dida.reparameterize()
            _fold_norm(unit, unit.dida.proj, 'bn')
            if hasattr(unit, 'conv'):
                _fold_norm(unit, unit.conv, 'bn2')


def _fold_norm(unit: nn.Module, conv: nn.Conv2d, norm_name: str) -> None:
    """Fold `unit.<norm_name>`, if a plain batch norm with running statistics, into `conv` and replace it by an
    Identity. Subclasses that do more (timm's BatchNormAct2d activates) stay."""
    norm = getattr(unit, norm_name)
    if type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm) or norm.running_mean is None:
        return
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    setattr(unit, norm_name, nn.Identity())


@torch.no_grad()
def _init_branch_weights(branch: nn.Module) -> None:
    """The released code's initialisation: convs kaiming-normal (fan_out, relu) with zero biases, norms 1 / 0.

    With zero generator biases the static part v of every generated kernel K = g * u + v is zero: the kernels
    start purely dynamic.
    """
    for m in branch.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DidaStage(nn.Module):
    """A static stage with a DIDA branch beside it: blocks(x) + branch(x).

    `grad_checkpointing` is set by models that switch checkpointing per stage (ConvNeXt, RegNet): the wrapper
    receives the flag instead of the stage it wraps, so it checkpoints both paths itself. Models that checkpoint
    block by block (timm's `checkpoint_seq(blocks, flatten=True)` in EfficientNet, MobileNetV3) iterate each
    stage into its blocks; iterating a DidaStage yields the whole stage, so blocks and branch stay one unit.
    """

    def __init__(self, blocks: nn.Module, branch: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.branch = branch
        self.grad_checkpointing = False
        self.register_load_state_dict_pre_hook(static_keys_to_blocks)

    @torch.jit.ignore
    def __iter__(self) -> Iterator[nn.Module]:
        return iter((self,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            out = checkpoint(self.blocks, x)
            return out + _cropped_to(checkpoint(self.branch, x), out)
        out = self.blocks(x)
        return out + _cropped_to(self.branch(x), out)


def static_keys_to_blocks(stage: DidaStage, state_dict: dict, prefix: str, *args: Any) -> None:
    """Rename, in place, the keys of the static network's stage in `state_dict` to the stage's place in this one.

    The static stage is `blocks` here (`layer4.0.conv1.weight` is `layer4.blocks.0.conv1.weight`), so a static
    twin's state dict loaded with `strict=False` (the usual way to load a backbone into a model with more modules)
    left the whole stage at its initialisation without a word; renamed, only the branch is missing. A key is renamed
    only where it is not one of the stage's own keys, its name under `blocks.` is, and the state dict does not hold
    that name already (a state dict with both stays refused by a strict load). Every DidaStage runs it as its load
    pre-hook (`*args`: the hook's other arguments), and `static_twin_filter_fn` on a twin's state dict. An FX graph
    of the model has no DidaStage, so no hook: load into the model before tracing, or through that filter.
    """
    own = set(stage.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        renamed = f'{prefix}blocks.{name}'
        if name not in own and f'blocks.{name}' in own and renamed not in state_dict:
            state_dict[renamed] = state_dict.pop(key)


@torch.fx.wrap  # FX would trace the sizes' comparison into control flow
def _cropped_to(branch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`branch` with the height and width of the stage output `out`.

    The branch's strided conv is padded, so it rounds an odd side up; a stage that downsamples without padding
    (ConvNeXt's 2x2 stride-2 conv) rounds it down. Output i of either reads the inputs from 2i on (ConvNeXt's
    centred at 2i + 0.5, the branch's at 2i), so the branch's extra last row or column has no counterpart in the
    stage's output and is dropped; any other mismatch is an error.
    """
    height, width = out.shape[-2], out.shape[-1]
    if branch.shape[-2] == height and branch.shape[-1] == width:
        # traced (timm's onnx_export), a view with `out`'s sizes: the trace loses the sizes in the DIDA unit's
        # reshapes, and the pooling after the sum needs them; eager, no op at all
        return branch.view_as(out) if torch.jit.is_tracing() else branch
    extra_height, extra_width = branch.shape[-2] - height, branch.shape[-1] - width
    if extra_height < 0 or extra_height > 1 or extra_width < 0 or extra_width > 1:
        raise RuntimeError(f'the DIDA branch maps to {list(branch.shape)}, which does not fit the stage output '
                           f'{list(out.shape)}')
    return branch[:, :, :height, :width]


def is_branch_parameter(name: str) -> bool:
    """Whether a parameter or state-dict key of a model belongs to a DIDA branch (`<stage>.branch.<...>`): the
    weights trained from scratch, at the higher learning rate, and absent from a static twin."""
    return '.branch.' in f'.{name}'


def _branch_is_untrained(branch: nn.Module) -> bool:
    """Whether `branch` is as initialised: no batch seen by its batch norms, every norm and scale at its initial
    value. Training moves all three (a forward in train mode alone moves the BN counters). An inference form
    (`DidaBranch.reparameterize`) has no generators and its batch norms folded: whether it was trained is unknown,
    so it is not taken for untrained."""
    for m in branch.modules():
        if isinstance(m, DidaModule) and hasattr(m, 'proj'):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None \
                and int(m.num_batches_tracked) > 0:
            return False
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            if not (torch.all(m.weight == 1) and torch.all(m.bias == 0)):
                return False
        if isinstance(m, LayerScale2d) and torch.unique(m.gamma).numel() != 1:
            return False
    return True


@torch.no_grad()
def _mute(branch: nn.Module) -> bool:
    """Make `branch` output exactly zero: zero its output scale, else the affine of its last norm when the activation
    after it maps 0 to 0 (ReLU, GELU, SiLU; not a sigmoid). Returns whether it could."""
    last = branch[-1]
    if hasattr(last, 'scale'):
        last.scale.gamma.zero_()
        return True
    norm, act = (last.bn2, last.act2) if hasattr(last, 'bn2') else (last.bn, last.act)
    if getattr(norm, 'weight', None) is None:
        raise ValueError(f'cannot mute a branch whose last norm ({type(norm).__name__}) has no affine parameters')
    if act(norm.weight.new_zeros(1)).item() != 0:
        return False
    norm.weight.zero_()
    norm.bias.zero_()
    return True


def muted_if_untrained(model: nn.Module) -> Optional[nn.Module]:
    """A copy of `model` that computes its static twin (every branch outputs zero), if all its DIDA branches are
    untrained and can be muted (a branch ending in an activation that maps 0 elsewhere, without a LayerScale, cannot);
    else None.

    A DIDA model loaded from a trained static twin carries a freshly initialised branch: as a model it is the static
    network plus noise, while the network its user trained is the static twin. The copy is that network, in the DIDA
    model's own parameter layout (a zero norm also stops the branch's gradients: it is for evaluating, not training).
    """
    stages = [m for m in model.modules() if isinstance(m, DidaStage)]
    if not stages or not all(_branch_is_untrained(stage.branch) for stage in stages):
        return None
    muted = copy.deepcopy(model)
    muted_stages = [_mute(m.branch) for m in muted.modules() if isinstance(m, DidaStage)]  # every one tried
    return muted if all(muted_stages) else None
