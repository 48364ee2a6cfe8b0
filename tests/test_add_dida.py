"""`add_dida` on timm CNNs and the registered families (ConvNeXt, EfficientNet, RegNetY, MobileNetV3, ResNet-D)."""
import copy
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.models import load_checkpoint
from timm.models._manipulate import group_parameters, group_with_matcher
from timm.utils.model import reparameterize_model

from dida_timm import add_dida, register_dida
from dida_timm.layers import DidaStage, is_branch_parameter
from dida_timm.models import static_twin_filter_fn
from dida_timm.models.dida_generic import _ordinal_fn
from dida_timm_models import our_models

FAMILIES = {
    'convnext': ['atto', 'femto', 'pico', 'nano', 'tiny', 'small'],
    'efficientnet': ['b0', 'b1', 'b2', 'b3'],
    'regnety': ['004', '008', '016', '032'],
    'mobilenetv3': ['large_100'],
    'resnet': ['26d', '50d'],
}
REGISTERED = [f'dida_{family}{"" if family == "resnet" else "_"}{v}' for family, vs in FAMILIES.items() for v in vs]
SMALLEST = ['dida_convnext_atto', 'dida_efficientnet_b0', 'dida_regnety_004', 'dida_mobilenetv3_large_100',
            'dida_resnet26d']
UNREGISTERED = ['resnet26', 'regnetx_002', 'efficientnet_lite0']
X = torch.randn(2, 3, 64, 64)


def _silence_branch(model: torch.nn.Module) -> None:
    """Zero the last norm of every branch unit, so the branch adds exactly zero."""
    for stage in model.modules():
        if isinstance(stage, DidaStage):
            for unit in stage.branch:
                torch.nn.init.zeros_(unit.bn.weight)
                torch.nn.init.zeros_(unit.bn.bias)


def _static_keys(model: torch.nn.Module) -> dict:
    """{key of the static twin: key in `model`} for every non-branch entry of the state dict."""
    stages = [f'{n}.' for n, m in model.named_modules() if isinstance(m, DidaStage)]
    out = {}
    for key in model.state_dict():
        stage = next((s for s in stages if key.startswith(s)), None)
        if stage and key.startswith(f'{stage}branch.'):
            continue
        out[key.replace(f'{stage}blocks.', stage, 1) if stage else key] = key
    return out


def test_every_family_is_registered_with_backbone_tags_and_an_untrained_one():
    assert set(REGISTERED) <= set(timm.list_models('dida_*'))
    for name in REGISTERED:
        base = name[len('dida_'):]
        tags = timm.list_models(name, include_tags=True)
        assert f'{name}.untrained' in tags
        # the default tag loads the base model's default ImageNet checkpoint, never an adapted one
        default = timm.models.get_pretrained_cfg(name)
        assert default.hf_hub_id == timm.models.get_pretrained_cfg(base).hf_hub_id
        assert default.hf_hub_id.startswith('timm/') and default.hf_hub_id.endswith('in1k')
        for tag in timm.list_pretrained(f'{name}.*'):
            assert timm.models.get_pretrained_cfg(tag).hf_hub_id == f'timm/{tag[len("dida_"):]}'
        untrained = timm.models.get_pretrained_cfg(f'{name}.untrained')
        assert not (untrained.hf_hub_id or untrained.url or untrained.file)
        base_cfg = timm.models.get_pretrained_cfg(base)
        for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'pool_size', 'first_conv'):
            assert getattr(untrained, key) == getattr(base_cfg, key) == getattr(default, key), (name, key)


def test_untrained_tag_refuses_pretrained_loading():
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('dida_convnext_atto.untrained', pretrained=True)


def test_branch_follows_the_stage_norm_and_activation_unless_told_otherwise():
    expected = {
        'dida_convnext_atto': ('stages.3', LayerNorm2d, 'GELU', 2),
        'dida_efficientnet_b0': ('blocks.6', torch.nn.BatchNorm2d, 'SiLU', 1),
        'dida_regnety_004': ('s4', torch.nn.BatchNorm2d, 'ReLU', 2),
        'dida_mobilenetv3_large_100': ('blocks.6', torch.nn.BatchNorm2d, 'Hardswish', 1),
        'dida_resnet26d': ('layer4', torch.nn.BatchNorm2d, 'ReLU', 2),
    }
    for name, (stage_name, norm, act, stride) in expected.items():
        model = timm.create_model(name, device='meta')
        stages = [n for n, m in model.named_modules() if isinstance(m, DidaStage)]
        assert stages == [stage_name], name
        unit = model.get_submodule(stage_name).branch[0]
        assert type(unit.bn) is norm and type(unit.act).__name__ == act and unit.dida.stride == stride, name
    unit = timm.create_model('dida_convnext_atto', dida_norm_layer='batchnorm2d', dida_act_layer='relu',
                             device='meta').stages[3].branch[0]
    assert type(unit.bn) is torch.nn.BatchNorm2d and type(unit.act) is torch.nn.ReLU


@pytest.mark.parametrize('name', REGISTERED)
def test_branch_gets_nonzero_gradients_after_loading_the_plain_models_weights(name, tmp_path):
    base = name[len('dida_'):]
    plain = timm.create_model(base, num_classes=5)
    path = tmp_path / f'{base}.safetensors'
    safetensors.torch.save_file(plain.state_dict(), str(path))
    model = timm.create_model(name, num_classes=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).train()
    # train.py --init-checkpoint loads the same file this way (dida_timm/training/run.py)
    initialised = timm.create_model(name, num_classes=5)
    load_checkpoint(initialised, str(path), filter_fn=static_twin_filter_fn)
    for loaded in (model, initialised):
        state, keys = loaded.state_dict(), _static_keys(loaded)
        assert keys.keys() == plain.state_dict().keys()
        for key, value in plain.state_dict().items():
            assert torch.equal(state[keys[key]], value), key
    torch.manual_seed(0)
    F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in model.named_parameters():
        if is_branch_parameter(n):
            assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}: {n} gets no gradient'


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'fx', 'getter'])
@pytest.mark.parametrize('name', ['dida_convnext_atto', 'dida_efficientnet_b0', 'dida_resnet26d'])
def test_every_feature_extractor_includes_the_branch(name, feature_cls):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    out = features(X)
    out = list(out.values()) if isinstance(out, dict) else out
    taps = model.forward_intermediates(X, intermediates_only=True)
    assert [o.shape for o in out] == [t.shape for t in taps]
    torch.testing.assert_close(out[-1], taps[-1])
    _silence_branch(model)
    assert not torch.allclose(out[-1], model.forward_intermediates(X, intermediates_only=True)[-1])


@pytest.mark.parametrize('name', SMALLEST)
def test_group_matcher_puts_the_branch_after_its_stage_and_before_the_head(name):
    model = timm.create_model(name, device='meta')
    stage = next(n for n, m in model.named_modules() if isinstance(m, DidaStage))
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        group_of = {n: gid for gid, names in groups.items() for n in names}
        branch = {g for n, g in group_of.items() if n.startswith(f'{stage}.branch.')}
        blocks = {g for n, g in group_of.items() if n.startswith(f'{stage}.blocks.')}
        assert len(branch) == 1, (name, coarse)
        if coarse:
            assert branch <= blocks
        else:
            # after its stage; timm's "join the previous group" ordinal may put a head conv with it
            assert min(branch) > max(blocks) and min(branch) < group_of[f"{model.pretrained_cfg['classifier']}.weight"]
    assert len(model.branch_parameters()) == sum(1 for n, _ in model.named_parameters() if is_branch_parameter(n))


@pytest.mark.parametrize('base', ['selecsls42', 'resnet18', 'convnext_atto'])
def test_layer_decay_groups_are_the_base_models_with_the_branch_after_its_stage(base):
    static = timm.create_model(base, device='meta')
    model = add_dida(timm.create_model(base, device='meta'))
    stage = next(n for n, m in model.named_modules() if isinstance(m, DidaStage))
    for coarse in (False, True):
        groups = list(group_parameters(model, model.group_matcher(coarse=coarse)).values())
        as_static = [[n.replace(f'{stage}.blocks.', f'{stage}.') for n in g if not is_branch_parameter(n)]
                     for g in groups]
        expected = group_parameters(static, static.group_matcher(coarse=coarse))
        assert [g for g in as_static if g] == list(expected.values())
        last = max(i for i, g in enumerate(groups) if any(n.startswith(f'{stage}.blocks.') for n in g))
        branch = [i for i, g in enumerate(groups) if any(is_branch_parameter(n) for n in g)]
        if coarse:
            assert branch == [last]
        else:  # a group of its own right after its stage's
            assert branch == [last + 1] and not as_static[last + 1]


def test_a_dict_group_matcher_gives_timms_ordinals():
    matcher = dict(stem=r'^stem', left_out=None, blocks=[(r'^features\.(\d+)', None), (r'^norm', (99999,))],
                   neck=r'^head')
    names = [(n, None) for n in ('stem.w', 'features.0.w', 'features.1.w', 'norm.w', 'head.0.w', 'head.1.w', 'fc.w')]
    assert group_with_matcher(names, _ordinal_fn(matcher)) == group_with_matcher(names, matcher)


@pytest.mark.parametrize('name', ['dida_convnext_atto', 'dida_mobilenetv3_large_100'])
def test_torchscript_fx_and_reset_classifier_match_eager(name):
    model = timm.create_model(name).eval()
    with timm.layers.set_layer_config(scriptable=True):
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(X), model(X))
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(X), model(X))
    model.reset_classifier(3)
    assert model(X).shape == (2, 3)
    assert model.forward_head(model.forward_features(X), pre_logits=True).shape[1] == model.head_hidden_size


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    model = timm.create_model('dida_regnety_004', num_classes=7).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), model(X), rtol=1e-4, atol=1e-4)


def test_output_stride_dilates_the_last_stage_and_keeps_the_branch_aligned():
    model = timm.create_model('dida_regnety_004', output_stride=16).eval()
    assert model.s4.branch[0].dida.stride == 1
    assert model.forward_features(X).shape[-2:] == (4, 4)


@pytest.mark.parametrize('base', ['tf_efficientnet_b0', 'convnextv2_atto', 'mobilenetv4_conv_small', 'densenet121',
                                  'dla46_c', 'xception41'])
def test_features_only_of_registered_bases_outside_the_families_names(base):
    # the feature config was looked up by the name's first word ('tf', 'convnextv2', 'mobilenetv4'): missed, and
    # timm's feature wrapper could not find the stages; then a table of three families: DenseNet's stages are
    # inside a Sequential, DLA returns levels 1-5 of six, Xception's features are hooks
    name = register_dida(base)
    features = timm.create_model(name, features_only=True).eval()
    plain = timm.create_model(base, features_only=True).eval()
    assert features.feature_info.channels() == plain.feature_info.channels()
    assert [f.shape for f in features(X)] == [f.shape for f in plain(X)]


@pytest.mark.parametrize('name', SMALLEST)
def test_every_input_size_the_base_takes_works_with_the_branch(name):
    # 48 px: ConvNeXt's last stage gets a 3 x 3 map and its unpadded 2x2 conv rounds down to 1 x 1, where the
    # branch's padded conv gives 2 x 2 (the sum failed); the branch's extra row and column are dropped
    model = timm.create_model(name, dida_stages=(-2, -1)).eval()
    features = timm.create_model(name.replace('dida_', ''), features_only=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        shapes = [f.shape for f in model.forward_intermediates(x, intermediates_only=True)]
        assert shapes == [f.shape for f in features(x)]
        stage = [m for m in model.modules() if isinstance(m, DidaStage)][-1]
        inp = torch.randn(2, stage.branch[0].dida.conv.in_channels, 3, 3)
        out, branch = stage.blocks(inp), stage.branch(inp)
        torch.testing.assert_close(stage(inp), out + branch[:, :, :out.shape[2], :out.shape[3]])


def test_a_base_whose_unpadded_stem_needs_more_than_the_small_probe_gets_its_branch():
    # Inception v3's unpadded stem leaves a 2 x 2 map for a 3 x 3 conv at the 64 px probe: add_dida failed there
    name = register_dida('inception_v3')
    features = timm.create_model(name, features_only=True).eval()
    plain = timm.create_model('inception_v3', features_only=True).eval()
    x = torch.randn(1, 3, 107, 107)
    with torch.no_grad():
        assert [f.shape for f in features(x)] == [f.shape for f in plain(x)]
    assert any(is_branch_parameter(n) for n, _ in features.named_parameters())


def test_a_branch_that_does_not_fit_its_stage_is_an_error():
    stage = DidaStage(torch.nn.Conv2d(8, 8, 3, stride=4, padding=1), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(RuntimeError, match=r'the DIDA branch maps to \[1, 8, 4, 4\], which does not fit the stage '
                                           r'output \[1, 8, 2, 2\]'):
        stage(torch.randn(1, 8, 8, 8))


def test_earlier_stages_and_deeper_branches():
    model = timm.create_model('dida_convnext_atto', dida_stages=(1, -1), branch_depth=2).eval()
    assert [n for n, m in model.named_modules() if isinstance(m, DidaStage)] == ['stages.1', 'stages.3']
    assert len(model.stages[1].branch) == 2 and model.stages[1].branch[0].dida.stride == 2
    assert model(X).shape == (2, 1000)
    with pytest.raises(ValueError, match='feature_info indices'):
        timm.create_model('dida_convnext_atto', dida_stages=(4,))


@pytest.mark.parametrize('base', UNREGISTERED)
def test_add_dida_on_unregistered_cnns_changes_outputs_and_round_trips_its_weights(base, tmp_path):
    # the static twin's weights come through timm's own pretrained path, then the branch is added
    twin = timm.create_model(base, num_classes=4)
    twin_path = tmp_path / 'twin.safetensors'
    safetensors.torch.save_file(twin.state_dict(), str(twin_path))
    model = add_dida(timm.create_model(base, num_classes=4, pretrained=True,
                                       pretrained_cfg_overlay=dict(file=str(twin_path), num_classes=4))).eval()
    assert isinstance(model, type(twin)) and type(model).__name__ == f'{type(twin).__name__}WithDida'
    keys = _static_keys(model)
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[keys[key]], value), key
    out = model(X)
    # the whole DIDA model round-trips through a safetensors file
    path = tmp_path / 'dida.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    loaded = add_dida(timm.create_model(base, num_classes=4)).eval()
    load_checkpoint(loaded, str(path), filter_fn=static_twin_filter_fn)
    torch.testing.assert_close(loaded(X), out)
    # ... and through timm's own loading path once the architecture has a name
    name = register_dida(base)
    assert register_dida(base) == name == f'dida_{base}' and name not in our_models()
    for weights in (path, twin_path):  # the DIDA state dict, or the static twin's with a fresh branch
        rebuilt = timm.create_model(name, num_classes=4, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(weights), num_classes=4)).eval()
        assert type(rebuilt) is type(model)
        if weights == path:
            torch.testing.assert_close(rebuilt(X), out)
        else:
            assert all(torch.equal(rebuilt.state_dict()[keys[k]], v) for k, v in twin.state_dict().items())
    assert type(pickle.loads(pickle.dumps(model))) is type(model)
    _silence_branch(model)
    assert not torch.allclose(model(X), out), 'the branch does not reach the output'


def test_a_pickled_model_loads_in_a_process_that_never_made_its_class(tmp_path):
    # `<Base>WithDida` is made when add_dida runs: unpickling by its name failed in a fresh process
    model = add_dida(timm.create_model('resnet10t', num_classes=3)).eval()
    torch.save(model, tmp_path / 'model.pt')
    x = torch.randn(1, 3, 32, 32)
    torch.save(model(x), tmp_path / 'out.pt')
    script = ("import sys, torch, timm, dida_timm\n"
              "model = torch.load(sys.argv[1], weights_only=False)\n"  # a file this test wrote
              "out = model(torch.load(sys.argv[2]))\n"
              "assert type(model).__name__ == 'ResNetWithDida' and model.group_matcher is not None\n"
              "torch.testing.assert_close(out, torch.load(sys.argv[3]))\n")
    torch.save(x, tmp_path / 'x.pt')
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'model.pt'), str(tmp_path / 'x.pt'),
                             str(tmp_path / 'out.pt')], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_subclass_of_a_dida_model_class_deep_copies():
    model = add_dida(timm.create_model('resnet10t', num_classes=3))
    model.__class__ = type('Sub', (type(model),), {})
    assert type(copy.deepcopy(model)) is type(model)


def test_reparameterize_model_reparameterizes_the_base_model_and_the_branch():
    # FastViT's MobileOne blocks fold their training-time branches (reparameterize); the DIDA branch beside its
    # last stage (LayerNorm-free: BatchNorm2d and GELU) stores its conv weight and folds its norm
    torch.manual_seed(0)
    model = add_dida(timm.create_model('fastvit_t8', num_classes=5)).eval()
    deployed = reparameterize_model(model)
    blocks = [m for m in deployed.modules() if type(m).__name__ == 'MobileOneBlock']
    assert blocks and all(m.reparam_conv is not None for m in blocks)
    (branch,) = [m.branch for m in deployed.modules() if isinstance(m, DidaStage)]
    assert hasattr(branch[0].dida, 'paths_weight') and isinstance(branch[0].bn, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=1e-4)


def test_reparameterize_model_keeps_a_norm_that_also_activates():
    # timm's BatchNormAct2d is a BatchNorm2d that also applies its activation: folding it would drop the GELU
    torch.manual_seed(0)
    model = add_dida(timm.create_model('resnet18', num_classes=5), norm_layer=BatchNormAct2d, act_layer='gelu')
    with torch.no_grad():
        for p in model.layer4.branch.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a branch that matters: at initialisation its output is tiny
    model.eval()
    deployed = reparameterize_model(model)
    assert isinstance(deployed.layer4.branch[0].bn, BatchNormAct2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-4)


def test_add_dida_refuses_what_it_cannot_handle():
    with pytest.raises(ValueError, match='vision transformer'):
        add_dida(timm.create_model('vit_tiny_patch16_224', device='meta'))
    model = add_dida(timm.create_model('regnetx_002'))
    with pytest.raises(ValueError, match='already have a DIDA branch'):
        add_dida(model)
    with pytest.raises(ValueError, match='features_only wrappers'):
        add_dida(timm.create_model('regnetx_002', features_only=True))
    # RepVGG's last feature module is its final_conv, an Identity there: nothing to run beside
    with pytest.raises(ValueError, match=r'ByobNet.final_conv \(feature_info index 4\) has no parameters'):
        add_dida(timm.create_model('repvgg_a0', device='meta'))
    # HRNet's classifier: its feature_info names modules of its features_only form, and its stages pass lists
    with pytest.raises(ValueError, match="HighResolutionNet has no module 'stem', which its feature_info names"):
        add_dida(timm.create_model('hrnet_w18_small', device='meta'), stages=(0,))
    with pytest.raises(ValueError, match=r'NCHW feature maps: HighResolutionNet.stage2 maps a list to a list'):
        add_dida(timm.create_model('hrnet_w18_small', device='meta'), stages=(2,))
    for name in ('no_such_model', 'regnetx_002.pycls_in1k', 'dida_resnet18'):
        with pytest.raises(ValueError, match='register_dida needs'):
            register_dida(name)


def test_released_resnet_layout_is_untouched():
    model = timm.create_model('dida_resnet50', device='meta')
    assert type(model).__name__ == 'DidaResNet' and len(model.layer4.branch) == 3
    assert model.layer4.branch[0].conv.out_channels == 2048


def test_the_package_factory_registers_any_timm_cnn_named_dida_base():
    from dida_timm.models.factory import create_model
    model = create_model('dida_efficientnet_lite0.untrained', num_classes=3)
    assert sum(isinstance(m, DidaStage) for m in model.modules()) == 1
    assert model.pretrained_cfg['architecture'] == 'dida_efficientnet_lite0'
    with pytest.raises(RuntimeError, match='Unknown model') as error:
        create_model('dida_no_such_cnn')
    # the message lists what `import dida_timm` registers, the families beside any timm CNN included, and not what
    # this process registered at run time
    assert "'dida_convnext_atto'" in str(error.value) and "'dida_resnet18'" in str(error.value)
    assert "'dida_efficientnet_lite0'" not in str(error.value)


@pytest.mark.parametrize('name, base', [('dida_resnet18', 'resnet18'), ('dida_convnext_atto', 'convnext_atto'),
                                        ('dida_digitnet_compact', 'digitnet_compact')])
def test_a_static_state_dict_loads_non_strict_into_everything_but_the_branch(name, base):
    # the usual way to load a backbone into a model with more modules: the stage beside the branch is `blocks` here,
    # and its keys were left out without a word (the stage kept its initialisation); now only the branch is missing
    torch.manual_seed(0)
    twin, model = timm.create_model(base), timm.create_model(name)
    result = model.load_state_dict(twin.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(is_branch_parameter(k) for k in result.missing_keys)
    twin_values = sorted(t.sum().item() for t in twin.state_dict().values())
    static_values = sorted(t.sum().item() for k, t in model.state_dict().items() if not is_branch_parameter(k))
    assert static_values == twin_values
    # a DIDA state dict without its branch is not renamed (its stage keys are the model's own already)
    dida_static = {k: v for k, v in model.state_dict().items() if not is_branch_parameter(k)}
    result = timm.create_model(name).load_state_dict(dida_static, strict=False)
    assert not result.unexpected_keys and all(is_branch_parameter(k) for k in result.missing_keys)
    # a state dict holding a stage under both names is refused by a strict load, as before the renaming
    both = {**model.state_dict(), **twin.state_dict()}
    with pytest.raises(RuntimeError, match='Unexpected key'):
        timm.create_model(name).load_state_dict(both)


def test_a_stage_that_shrinks_its_map_without_striding_is_refused_when_the_branch_is_added():
    # Inception's Conv2d_4a_3x3 (unpadded, stride 1: 73 -> 71) got a stride-2 branch from the rounded-up size ratio,
    # and the model failed at every forward; no padded branch fits beside it
    with pytest.raises(ValueError, match=r'Conv2d_4a_3x3 maps 73x73 to 71x71: not a downsampling by a whole stride'):
        add_dida(timm.create_model('inception_v3'), stages=(1,))
    model = add_dida(timm.create_model('inception_v3', num_classes=3), stages=(2,)).eval()
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3)


def test_an_option_only_timms_features_classes_take_is_refused_naming_the_network_it_reached():
    # features_only builds the classification network and wraps it; MobileNetV3 itself takes no output_stride
    with pytest.raises(TypeError, match=r"dida_mobilenetv3_large_100 is mobilenetv3_large_100's classification "
                                        r"network .* unexpected keyword argument 'output_stride'"):
        timm.create_model('dida_mobilenetv3_large_100', features_only=True, output_stride=16)
    with pytest.raises(TypeError, match=r"^[^ ]*__init__\(\) got an unexpected keyword argument 'drop_rat'"):
        timm.create_model('dida_mobilenetv3_large_100', drop_rat=0.1)  # not features_only: timm's own message


def test_pretrained_weights_adapt_to_in_chans_with_a_branch_beside_the_stem(tmp_path):
    # the stem's conv moves into the DidaStage: timm's first_conv trait must follow it, or in_chans adaptation of the
    # pretrained stem finds no weight to adapt and the load fails on the shape
    twin = timm.create_model('regnety_004')
    path = tmp_path / 'twin.safetensors'
    safetensors.torch.save_file(twin.state_dict(), str(path))
    model = timm.create_model('dida_regnety_004', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              dida_stages=(0,), dida_reduction=1, in_chans=1)
    assert timm.models.get_model_traits(model)['first_conv'] == 'stem.blocks.conv'
    torch.testing.assert_close(model.stem.blocks.conv.weight, twin.stem.conv.weight.sum(1, keepdim=True))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1000)
    # add_dida on a built model renames the trait too; a conv outside the wrapped stages keeps its name
    assert timm.models.get_model_traits(add_dida(timm.create_model('regnety_004'), stages=(0,), reduction=1))[
        'first_conv'] == 'stem.blocks.conv'
    assert timm.models.get_model_traits(add_dida(timm.create_model('regnety_004')))['first_conv'] == 'stem.conv'


def test_features_only_of_a_base_timm_serves_through_its_getter_class():
    # CSPNeXt's features model is timm's FeatureGetterNet: a flattened feature list lost its top-level stem
    name = register_dida('cspnext_s')
    features = timm.create_model(name, features_only=True)
    static = timm.create_model('cspnext_s', features_only=True)
    outs = features(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == features.feature_info.channels() == static.feature_info.channels()
    assert [64 // o.shape[-1] for o in outs] == static.feature_info.reduction()


def test_a_channels_last_model_is_refused_before_its_height_is_read_as_channels():
    with pytest.raises(ValueError, match='add_dida needs NCHW feature maps: MambaOut runs its stages in NHWC'):
        add_dida(timm.create_model('mambaout_femto', device='meta'), stages=(0,))


def test_the_probe_falls_back_to_the_input_size_a_model_asserts():
    # BotNet asserts its 256 px input: the small probe's AssertionError skipped the fallback
    model = add_dida(timm.create_model('botnet26t_256', num_classes=3), stages=(-2,))
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 3)


def test_register_dida_refuses_a_base_whose_dida_name_is_another_layout():
    # dida_resnet18 is the released code's two-unit branch: an add_dida(resnet18) state dict does not load into it
    with pytest.raises(ValueError, match=r"dida_resnet18 is already a model of its own .* Rebuild that model with "
                                         r"add_dida"):
        register_dida('resnet18')
    assert register_dida('convnext_atto') == 'dida_convnext_atto'  # a family built as add_dida builds it


def test_a_static_checkpoint_without_batch_norm_counters_loads_as_into_the_static_twin(tmp_path):
    # checkpoints before torch's batch norm version 2 (and many converted ones) have no num_batches_tracked: torch
    # fills them in, and timm's strict load into resnet18 takes such a file
    state = {k: v for k, v in timm.create_model('resnet18').state_dict().items()
             if not k.endswith('num_batches_tracked')}
    path = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(state, str(path))
    model = timm.create_model('dida_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key.replace('layer4.', 'layer4.blocks.')], value, msg=key)
    state.pop('layer1.0.bn1.running_mean')  # a statistic the twin has is still required
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(RuntimeError, match=r"missing \['layer1.0.bn1.running_mean'\]"):
        timm.create_model('dida_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
