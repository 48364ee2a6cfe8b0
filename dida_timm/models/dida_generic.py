"""DIDA beside any timm CNN: `add_dida` and the registered ConvNeXt, EfficientNet, RegNetY, MobileNetV3, ResNet-D.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028
(Deng, Zhou, Li, He, Song, Xiang; IEEE T-IP 2022).

`add_dida(model)` takes a model built by `timm.create_model` and wraps one of its feature stages (by default the
last, the paper's res4 placement) in a `DidaStage`: Z = stage(X) + branch(X). Stages are the modules timm's own
`feature_info` names; their input and output shapes (so the branch's channels and stride, dilated stages
included) are read from one small forward pass. The model's class becomes a subclass that only adds a
`group_matcher` aware of the branch, so forward_features, forward_head, forward_intermediates, features_only,
pruning, grad checkpointing, TorchScript and FX are the base model's own code running through the wrapper.

Differences from DIDA-ResNet (dida_resnet.py, the released layout, unchanged):
* the branch is the single unit of the paper's text, DIDA module (C_in -> C_out) -> norm -> act, without the
  released code's 1x1 projection, which alone would cost 1-4 % of these networks' MACs;
* its norm and activation follow the wrapped stage (LayerNorm2d/GELU for ConvNeXt, BN/SiLU for EfficientNet,
  BN/Hardswish for MobileNetV3), BN/ReLU on request;
* EfficientNet and MobileNetV3 name the last block group of a resolution as its feature (`blocks.6`, at
  stride 32 like the group before it), so their branch sits beside that group.

Registered families load timm's ImageNet checkpoints (the base model's own tags) into the static network with
strict key checks and a fresh branch; `<name>.untrained` has no weights.
"""
import copyreg
import functools
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, PatchEmbed, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models import FeatureHookNet, list_pretrained, model_entrypoint
from timm.models._features import FeatureGetterNet

from dida_timm.layers import DidaBranch, DidaStage, is_branch_parameter

from ._static_twin import static_twin_filter_fn

__all__ = ['add_dida']

# activations that gate (SE, attention) rather than follow a norm; never the branch's activation
_GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax, nn.Identity)


def _stage_norm_act(stage: nn.Module) -> Tuple[Type[nn.Module], Type[nn.Module]]:
    """The branch's norm and activation following `stage`'s: LayerNorm-family -> LayerNorm2d, else BatchNorm2d."""
    norm = next((m for m in stage.modules() if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase))), None)
    acts = (m for m in stage.modules() if m.__class__.__module__.startswith(('torch.nn.modules.activation',
                                                                             'timm.layers.activations')))
    act = next((m for m in acts if not isinstance(m, _GATES)), None)
    return (LayerNorm2d if isinstance(norm, nn.LayerNorm) else nn.BatchNorm2d), (type(act) if act else nn.ReLU)


def _refuse_transformer(model: nn.Module) -> None:
    if any(isinstance(m, (PatchEmbed, nn.MultiheadAttention)) or type(m).__name__ == 'Attention'
           for m in model.modules()):
        raise ValueError(
            f'add_dida cannot place a DIDA branch in {type(model).__name__}: it is a vision transformer. Its blocks '
            f'read and return token sequences [N, L, C] at one resolution, while the DIDA module convolves a '
            f'spatial NCHW map with per-sample kernels beside a stage that changes resolution or width.')


@torch.no_grad()
def _probe_shapes(model: nn.Module, names: Sequence[str]) -> Dict[str, Tuple[Any, Any]]:
    """Input and output shape of each named module called by one forward_features pass in eval mode (the objects
    themselves where they are not tensors: HRNet's stages take and give lists)."""
    reduction = max(f['reduction'] for f in model.feature_info)
    small = max(64, 2 * reduction)
    # a small map is cheap; unpadded stems (Inception's) need more, and the model's own input size always works
    sizes = (small, max(small, getattr(model, 'pretrained_cfg', {}).get('input_size', (0, 0, 0))[-1]))
    param = next(model.parameters())
    in_chans = getattr(model, 'in_chans', None) or next(
        m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    shapes = {}

    def record(name, module, args, output):
        shapes[name] = (args[0].shape if args and torch.is_tensor(args[0]) else args[0] if args else None,
                        output.shape if torch.is_tensor(output) else output)

    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: record(n, m, a, o)) for n in names]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # BN running statistics must not move
        for size in sizes:
            try:
                model.forward_features(torch.zeros(1, in_chans, size, size, device=param.device, dtype=param.dtype))
                break
            except (RuntimeError, AssertionError):  # BotNet and HaloNet assert their input size
                if size == sizes[-1]:
                    raise
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    return shapes


def _branch_stride(model: nn.Module, name: str, in_shape: torch.Size, out_shape: torch.Size) -> int:
    """The stride of the branch beside stage `name`, which maps `in_shape` to `out_shape` in the probe.

    The branch pads its convs, so at stride s it maps a side of n to ceil(n / s); the stage's output may have one row
    or column fewer (an unpadded strided conv, cropped by `DidaStage`). A stage that shrinks its map without striding
    (an unpadded stride-1 conv, as Inception's `Conv2d_4a_3x3`) has no branch that fits: refused here, not at every
    forward.
    """
    stride = max(1, round(in_shape[2] / out_shape[2]))
    fits = all(out_shape[i] <= (in_shape[i] - 1) // stride + 1 <= out_shape[i] + 1 for i in (2, 3))
    if not fits:
        raise ValueError(
            f'{type(model).__name__}.{name} maps {in_shape[2]}x{in_shape[3]} to {out_shape[2]}x{out_shape[3]}: not a '
            f'downsampling by a whole stride (an unpadded conv?), so no DIDA branch fits beside it; choose another '
            f'stage with stages=')
    return stride


def add_dida(
        model: nn.Module,
        stages: Optional[Sequence[int]] = None,
        branch_depth: int = 1,
        norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        layer_scale_init: Optional[float] = None,
        **dida_options: Any,
) -> nn.Module:
    """Add DIDA branches beside feature stages of a timm CNN, in place: Z = stage(X) + branch(X).

    Args:
        model: A model from `timm.create_model` (not features_only) with NCHW feature maps and `feature_info`.
        stages: `feature_info` indices (as timm's `out_indices`, negative allowed) of the stages that get a
            branch; None gives the last one (the paper's res4 placement).
        branch_depth: Units per branch (the paper's text: one).
        norm_layer: Branch norm (e.g. 'batchnorm2d'); None follows the stage's own norm.
        act_layer: Branch activation (e.g. 'relu'); None follows the stage's own activation.
        layer_scale_init: Initial value of a learned per-channel scale on the branch output (None: no scale).
        **dida_options: DidaModule options: reduction, dilations, kernel_size, shared_reduction, dynamic.

    Returns:
        The same model, its class now a subclass of its timm class with a branch-aware `group_matcher`.

    Raises:
        ValueError: for a model add_dida cannot handle (a vision transformer, no feature_info, token or NHWC
            features), a stage index out of range, or a stage that already has a branch.
    """
    if isinstance(model, DidaStage) or not hasattr(model, 'forward_features'):
        raise ValueError(f'add_dida needs a timm classification model, got {type(model).__name__} '
                         f'(features_only wrappers: add the branch before wrapping)')
    _refuse_transformer(model)
    if getattr(model, 'output_fmt', 'NCHW') != 'NCHW':  # MambaOut's stages run channels-last: [N, H, W, C]
        raise ValueError(f'add_dida needs NCHW feature maps: {type(model).__name__} runs its stages in '
                         f'{model.output_fmt}')
    feature_info = getattr(model, 'feature_info', None)
    if not isinstance(feature_info, list) or not feature_info:
        raise ValueError(f'{type(model).__name__} has no feature_info list, so add_dida cannot find its stages')
    num_stages = len(feature_info)
    stages = (num_stages - 1,) if stages is None else tuple(stages)
    if not stages or any(not -num_stages <= s < num_stages for s in stages):
        raise ValueError(f'stages must be feature_info indices of {type(model).__name__} '
                         f'(-{num_stages}..{num_stages - 1}), got {stages!r}')
    indices = sorted({s % num_stages for s in stages})
    names = [feature_info[i]['module'] for i in indices]
    modules = dict(model.named_modules())
    for i, name in zip(indices, names):
        if name not in modules:  # HRNet's classifier lists the modules of its features_only form
            raise ValueError(f'{type(model).__name__} has no module {name!r}, which its feature_info names at index '
                             f'{i}: add_dida cannot find that stage; choose another with stages=')
        if next(modules[name].parameters(), None) is None:
            raise ValueError(f'{type(model).__name__}.{name} (feature_info index {i}) has no parameters: a DIDA '
                             'branch runs beside a stage, so choose another with stages=')
    wrapped = [n for n in names if isinstance(modules[n], DidaStage)]
    if wrapped:
        raise ValueError(f'{wrapped} already have a DIDA branch')
    shapes = _probe_shapes(model, names)
    for name in names:
        if name not in shapes:
            raise ValueError(f'{type(model).__name__}.{name} is not called by forward_features, so add_dida cannot '
                             'put a branch beside it; choose another stage with stages=')
        in_shape, out_shape = shapes[name]
        if not all(isinstance(s, torch.Size) and len(s) == 4 for s in (in_shape, out_shape)):
            shown = [tuple(s) if isinstance(s, torch.Size) else f'a {type(s).__name__}' for s in (in_shape, out_shape)]
            raise ValueError(f'add_dida needs NCHW feature maps: {type(model).__name__}.{name} maps {shown[0]} to '
                             f'{shown[1]}')
        stride = _branch_stride(model, name, in_shape, out_shape)
        stage = model.get_submodule(name)
        stage_norm, stage_act = _stage_norm_act(stage)
        param = next(stage.parameters())
        branch = DidaBranch(
            in_shape[1],
            out_shape[1],
            out_shape[1],
            depth=branch_depth,
            stride=stride,
            layer_scale_init=layer_scale_init,
            norm_layer=get_norm_layer(norm_layer) if norm_layer else stage_norm,
            act_layer=get_act_layer(act_layer) if act_layer else stage_act,
            device=param.device,
            dtype=param.dtype,
            **dida_options,
        )
        parent, _, child = name.rpartition('.')
        parent_module = model.get_submodule(parent) if parent else model
        setattr(parent_module, child, DidaStage(stage, branch))
    _rename_first_conv(model, names)
    model.__class__ = _with_dida_class(type(model))
    return model


def _rename_first_conv(model: nn.Module, stages: Sequence[str]) -> None:
    """Name timm's `first_conv` trait (the stem conv whose pretrained weights timm adapts to `in_chans`) as it is
    inside the stages just wrapped: `stem.conv` -> `stem.blocks.conv`.

    The trait is the model's own (timm keeps it in `model._traits`, set when the base was built, and it outranks the
    pretrained_cfg's entry); a stale one makes `in_chans=1` with pretrained weights fail on a branch beside the stem.
    """
    traits = getattr(model, '_traits', None)
    first = traits.get('first_conv') if traits else None
    if not first:
        return

    def renamed(conv: str) -> str:
        stage = next((s for s in stages if conv == s or conv.startswith(f'{s}.')), None)
        return f'{stage}.blocks{conv[len(stage):]}' if stage else conv

    convs = tuple(renamed(c) for c in ((first,) if isinstance(first, str) else first))
    model._traits = dict(traits, first_conv=convs[0] if isinstance(first, str) else convs)


def _ordinal_fn(matcher: Union[Dict[str, Any], Callable]) -> Callable[[str], Tuple[float, ...]]:
    """A parameter name -> group ordinal function from a timm `group_matcher` (regex dict or callable), with the
    ordinals timm's `group_with_matcher` gives."""
    if callable(matcher):
        return lambda name: tuple(o) if isinstance(o := matcher(name), (tuple, list)) else (o,)
    compiled = []
    for position, spec in enumerate(matcher.values()):
        if spec is None:  # a group without a pattern (timm's way to leave one out) matches nothing
            continue
        for regex, suffix in ([(spec, None)] if isinstance(spec, str) else spec):
            compiled.append((re.compile(regex), (position,), suffix))

    def ordinal(name: str) -> Tuple[float, ...]:
        for regex, prefix, suffix in compiled:
            found = regex.match(name)
            if found:
                # the group's position first, as in timm: without it the numbers of different groups' patterns
                # collide ('features.0', 'head.0') and the groups whose pattern has none merge ('stem', 'head')
                return tuple(float(x) for part in (prefix, found.groups(), suffix) if part for x in part)
        return (float('inf'),)  # unmatched (head) sorts last, as in timm

    return ordinal


class _WithDida:
    """Mixin of the classes `add_dida` gives a model: parameter groups that know the branch."""

    def __reduce_ex__(self, protocol: int) -> Union[str, Tuple[Any, ...]]:
        # the class is made at run time, so another process that unpickles the model may not have it yet: name the
        # timm class it extends, and make it on loading
        reduced = super().__reduce_ex__(protocol)
        if reduced[0] is not copyreg.__newobj__ or type(self) not in _CLASSES.values():  # not one of ours: a subclass
            return reduced
        return (_new_with_dida, (type(self).__bases__[1],)) + tuple(reduced[2:])

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """The base model's groups for the static weights; each branch right after its stage (coarse: inside it)."""
        ordinal = _ordinal_fn(super().group_matcher(coarse=coarse))
        stages = [f'{n}.' for n, m in self.named_modules() if isinstance(m, DidaStage)]

        def static_name(name: str) -> str:
            stage = next((s for s in stages if name.startswith(f'{s}blocks.')), None)
            return f'{stage}{name[len(stage) + len("blocks."):]}' if stage else name

        last = {s: max(ordinal(static_name(n)) for n, _ in self.named_parameters() if n.startswith(f'{s}blocks.'))
                for s in stages}

        def match(name: str) -> Tuple[float, ...]:
            stage = next((s for s in stages if name.startswith(f'{s}branch.')), None)
            if stage is None:
                return ordinal(static_name(name))
            # a longer tuple with the stage's last ordinal as prefix sorts after it and before the next group
            return last[stage] if coarse else last[stage] + (float('inf'),)

        return match

    @torch.jit.ignore
    def branch_parameters(self) -> List[nn.Parameter]:
        """Parameters of the DIDA branches (trained from scratch, at the head's learning rate)."""
        return [p for n, p in self.named_parameters() if is_branch_parameter(n)]


_CLASSES: Dict[type, type] = {}


def _new_with_dida(base: type) -> nn.Module:
    """An empty `<base>WithDida` for unpickling to fill."""
    cls = _with_dida_class(base)
    return cls.__new__(cls)


def _with_dida_class(cls: type) -> type:
    """`<cls>WithDida`, one per timm class, made on first use and kept as a module global (found by name in the
    process that made it; pickles name the timm class instead, `_WithDida.__reduce_ex__`)."""
    if issubclass(cls, _WithDida):
        return cls
    if cls not in _CLASSES:
        name = f'{cls.__name__}WithDida'
        _CLASSES[cls] = type(name, (_WithDida, cls), {'__module__': __name__, '__qualname__': name})
        globals()[name] = _CLASSES[cls]
    return _CLASSES[cls]


# model kwargs of the registered families (DidaResNet's names) -> add_dida's
_RENAMED = {'dida_stages': 'stages', 'dida_layer_scale': 'layer_scale_init', 'dida_norm_layer': 'norm_layer',
            'dida_act_layer': 'act_layer'}


def _create_dida_model(base: str, **kwargs: Any) -> nn.Module:
    """timm's `base` architecture (built by its own entrypoint, no weights) with DIDA branches."""
    dida_kwargs = {_RENAMED.get(k, k[len('dida_'):]): kwargs.pop(k) for k in list(kwargs) if k.startswith('dida_')}
    if 'branch_depth' in kwargs:
        dida_kwargs['branch_depth'] = kwargs.pop('branch_depth')
    return add_dida(model_entrypoint(base)(pretrained=False, **kwargs), **dida_kwargs)


@functools.lru_cache(maxsize=None)
def _feature_cfg(base: str) -> Dict[str, Any]:
    """timm's own features_only defaults for `base`, read off its features model built on the meta device.

    The families' settings differ (ConvNeXt returns its four levels, DLA levels 1-5, Xception hooks) and live in
    each timm module's private builder, so they are asked of timm rather than tabled here. Stages named inside a
    Sequential (`stages.3`, `features.denseblock1`) need it flattened; ResNet's `layer1`.. must stay whole.
    """
    with torch.device('meta'):
        features = timm.create_model(base, features_only=True)
    cfg: Dict[str, Any] = dict(out_indices=tuple(features.feature_info.out_indices))
    if isinstance(features, FeatureHookNet):
        cfg['feature_cls'] = 'hook'
    elif isinstance(features, FeatureGetterNet):  # CSPNeXt-like bases: their forward_intermediates gives the maps
        cfg['feature_cls'] = 'getter'
    elif any('.' in name for name in features.feature_info.module_name()):
        cfg['flatten_sequential'] = True
    return cfg


def create_dida(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build `dida_<base>` through timm's `build_model_with_cfg` (weights of a static checkpoint load with the
    branch left fresh)."""
    base = variant[len('dida_'):]
    try:
        return build_model_with_cfg(
            lambda **kw: _create_dida_model(base, **kw),
            variant,
            pretrained,
            pretrained_filter_fn=static_twin_filter_fn,
            # the base family's features_only classes (EfficientNetFeatures, ...) have no branch: wrap this model
            # (a copy: timm writes into it)
            feature_cfg=dict(_feature_cfg(base)) if kwargs.get('features_only') else None,
            **kwargs,
        )
    except TypeError as e:
        if not kwargs.get('features_only') or 'unexpected keyword argument' not in str(e):
            raise
        # options only timm's features classes take (MobileNetV3Features' output_stride, feature_location) reach
        # the classification network's constructor, which has none of them
        raise TypeError(f'{variant} is {base}\'s classification network with a DIDA branch (features_only wraps it '
                        f'as timm\'s feature extraction does), which does not take this option: {e}') from e


def dida_cfgs(base: str) -> Dict[str, Dict[str, Any]]:
    """One tag per ImageNet-1k tag of `base` (loading that checkpoint), default first, then `untrained`."""
    default = get_pretrained_cfg(base).to_dict()
    tags = sorted((t for t in list_pretrained(f'{base}.*') if t.endswith('in1k')),
                  key=lambda t: t.split('.', 1)[1] != default['tag'])
    cfgs = {}
    for tag in tags:
        cfg = get_pretrained_cfg(tag).to_dict()
        for k in ('architecture', 'tag', 'url', 'paper_ids', 'origin_url'):
            cfg.pop(k, None)
        cfgs[f'dida_{tag}'] = dict(cfg, paper_ids='arXiv:2203.05028',
                                   notes=(f'static network from timm/{tag}, DIDA branch initialised fresh',))
    untrained = {k: v for k, v in default.items()
                 if k not in ('architecture', 'tag', 'url', 'hf_hub_id', 'file', 'paper_ids', 'origin_url')}
    cfgs[f'dida_{base}.untrained'] = dict(untrained, paper_ids='arXiv:2203.05028')
    return cfgs


_BASES = (
    *(f'convnext_{s}' for s in ('atto', 'femto', 'pico', 'nano', 'tiny', 'small')),
    *(f'efficientnet_b{i}' for i in range(4)),
    *(f'regnety_{s}' for s in ('004', '008', '016', '032')),
    'mobilenetv3_large_100', 'resnet26d', 'resnet50d',
)

default_cfgs = generate_default_cfgs({name: cfg for base in _BASES for name, cfg in dida_cfgs(base).items()})


@register_model
def dida_convnext_atto(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-Atto: timm's convnext_atto with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_atto', pretrained, **kwargs)


@register_model
def dida_convnext_femto(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-Femto: timm's convnext_femto with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_femto', pretrained, **kwargs)


@register_model
def dida_convnext_pico(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-Pico: timm's convnext_pico with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_pico', pretrained, **kwargs)


@register_model
def dida_convnext_nano(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-Nano: timm's convnext_nano with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_nano', pretrained, **kwargs)


@register_model
def dida_convnext_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-T: timm's convnext_tiny with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_tiny', pretrained, **kwargs)


@register_model
def dida_convnext_small(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ConvNeXt-S: timm's convnext_small with a one-unit DIDA branch beside stages.3."""
    return create_dida('dida_convnext_small', pretrained, **kwargs)


@register_model
def dida_efficientnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-EfficientNet-B0: timm's efficientnet_b0 with a one-unit DIDA branch beside blocks.6."""
    return create_dida('dida_efficientnet_b0', pretrained, **kwargs)


@register_model
def dida_efficientnet_b1(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-EfficientNet-B1: timm's efficientnet_b1 with a one-unit DIDA branch beside blocks.6."""
    return create_dida('dida_efficientnet_b1', pretrained, **kwargs)


@register_model
def dida_efficientnet_b2(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-EfficientNet-B2: timm's efficientnet_b2 with a one-unit DIDA branch beside blocks.6."""
    return create_dida('dida_efficientnet_b2', pretrained, **kwargs)


@register_model
def dida_efficientnet_b3(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-EfficientNet-B3: timm's efficientnet_b3 with a one-unit DIDA branch beside blocks.6."""
    return create_dida('dida_efficientnet_b3', pretrained, **kwargs)


@register_model
def dida_regnety_004(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-RegNetY-400MF: timm's regnety_004 with a one-unit DIDA branch beside s4."""
    return create_dida('dida_regnety_004', pretrained, **kwargs)


@register_model
def dida_regnety_008(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-RegNetY-800MF: timm's regnety_008 with a one-unit DIDA branch beside s4."""
    return create_dida('dida_regnety_008', pretrained, **kwargs)


@register_model
def dida_regnety_016(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-RegNetY-1.6GF: timm's regnety_016 with a one-unit DIDA branch beside s4."""
    return create_dida('dida_regnety_016', pretrained, **kwargs)


@register_model
def dida_regnety_032(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-RegNetY-3.2GF: timm's regnety_032 with a one-unit DIDA branch beside s4."""
    return create_dida('dida_regnety_032', pretrained, **kwargs)


@register_model
def dida_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-MobileNetV3-Large 1.0: timm's mobilenetv3_large_100 with a one-unit DIDA branch beside blocks.6."""
    return create_dida('dida_mobilenetv3_large_100', pretrained, **kwargs)


@register_model
def dida_resnet26d(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ResNet-26-D: timm's resnet26d with a one-unit DIDA branch beside layer4."""
    return create_dida('dida_resnet26d', pretrained, **kwargs)


@register_model
def dida_resnet50d(pretrained: bool = False, **kwargs) -> nn.Module:
    """DIDA-ResNet-50-D: timm's resnet50d with a one-unit DIDA branch beside layer4."""
    return create_dida('dida_resnet50d', pretrained, **kwargs)

