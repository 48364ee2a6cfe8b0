"""DIDA-ResNets as timm models (docs/METHOD.md section 2): registration, weights, the timm API and export paths."""
import copy

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import load_checkpoint
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.utils.model import reparameterize_model

from dida_timm.layers import DidaBranch, DidaModule, DidaStage, muted_if_untrained
from dida_timm.models import DidaResNet, static_twin_filter_fn

DEPTHS = (18, 34, 50, 101, 152)
SMALL_INPUT = (2, 3, 64, 64)


def _silence_branch(model: DidaResNet) -> None:
    """Zero the last norm of every branch unit, so the branch adds exactly zero."""
    for stage in model.modules():
        if isinstance(stage, DidaStage):
            for unit in stage.branch:
                last_norm = unit.bn2 if hasattr(unit, 'bn2') else unit.bn
                torch.nn.init.zeros_(last_norm.weight)
                torch.nn.init.zeros_(last_norm.bias)


def test_every_depth_is_registered_with_its_pretrained_tags():
    assert timm.list_models('dida_resnet*', module='dida_resnet') == [f'dida_resnet{d}' for d in DEPTHS]
    for depth in DEPTHS:
        tags = timm.list_models(f'dida_resnet{depth}', include_tags=True)
        assert set(tags) == {f'dida_resnet{depth}.{t}' for t in ('tv_in1k', 'a1_in1k', 'untrained')}
        assert timm.list_pretrained(f'dida_resnet{depth}.*') == [
            f'dida_resnet{depth}.a1_in1k', f'dida_resnet{depth}.tv_in1k']


def test_untagged_name_of_every_model_is_untrained():
    # `pretrained=True` without a tag must not silently load ImageNet or adapted weights
    for name in timm.list_models(module=['dida_resnet', 'dida_digitnet']):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == 'untrained' and not cfg.has_weights, f'{name} defaults to {cfg.tag}'


def test_pretrained_tags_name_existing_timm_checkpoints():
    for name in timm.list_pretrained('dida_resnet*'):
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        assert hub_id.startswith('timm/') and hub_id[len('timm/'):] in timm.list_pretrained('resnet*')


def test_untrained_tag_refuses_pretrained_loading():
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('dida_resnet18.untrained', pretrained=True)


def test_released_layout_has_one_unit_per_layer4_block():
    for depth, units in zip(DEPTHS, (2, 3, 3, 3, 3)):
        model = timm.create_model(f'dida_resnet{depth}', device='meta')
        assert isinstance(model.layer4, DidaStage) and len(model.layer4.branch) == units
        assert not any(isinstance(getattr(model, f'layer{s}'), DidaStage) for s in (1, 2, 3))


def test_resnet18_with_seven_classes_matches_paper_parameter_count():
    # paper: 11.22M parameters with the 7-class PACS head
    model = timm.create_model('dida_resnet18', num_classes=7)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 11.22


def test_pretrained_tag_loads_imagenet_weights_into_static_network(offline_hub):
    torch.manual_seed(0)
    fresh = timm.create_model('dida_resnet18')
    torch.manual_seed(0)
    model = timm.create_model('dida_resnet18.tv_in1k', pretrained=True)
    plain = timm.create_model('resnet18.tv_in1k', pretrained=True)
    for name, value in plain.state_dict().items():
        key = name.replace('layer4.', 'layer4.blocks.', 1)
        torch.testing.assert_close(model.state_dict()[key], value, msg=f'{key} not loaded')
    for name, value in model.layer4.branch.state_dict().items():
        torch.testing.assert_close(value, fresh.layer4.branch.state_dict()[name])


def test_pretrained_adapts_head_and_input_channels(offline_hub):
    model = timm.create_model('dida_resnet18.tv_in1k', pretrained=True, in_chans=1, num_classes=5)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / 'resnet34.safetensors'
    safetensors.torch.save_file(timm.create_model('resnet34').state_dict(), str(path))
    with pytest.raises(RuntimeError, match='do not match the static network inside this DidaResNet'):
        timm.create_model('dida_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_dida_checkpoint_round_trips_through_a_file(tmp_path):
    model = timm.create_model('dida_resnet18', num_classes=7).eval()
    path = tmp_path / 'dida.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    loaded = timm.create_model(
        'dida_resnet18', num_classes=7, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    x = torch.randn(SMALL_INPUT)
    torch.testing.assert_close(loaded(x), model(x))


def test_branch_gets_nonzero_gradients_after_loading_imagenet_weights(offline_hub):
    model = timm.create_model('dida_resnet18.tv_in1k', pretrained=True, num_classes=7).train()
    logits = model(torch.randn(4, 3, 96, 96))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        if '.branch.' in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f'branch parameter {name} gets no gradient'


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'fx', 'getter'])
def test_every_feature_extractor_includes_the_branch(feature_cls):
    x = torch.randn(SMALL_INPUT)
    torch.manual_seed(0)
    model = timm.create_model('dida_resnet18').eval()
    torch.manual_seed(0)
    features = timm.create_model('dida_resnet18', features_only=True, feature_cls=feature_cls).eval()
    out = features(x)
    out = list(out.values()) if isinstance(out, dict) else out
    assert [o.shape[1] for o in out] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(out[-1], model.forward_features(x))
    _silence_branch(model)
    assert not torch.allclose(out[-1], model.forward_features(x)), 'last feature map misses the DIDA branch'


def test_forward_intermediates_include_the_branch_and_match_forward_features():
    model = timm.create_model('dida_resnet18').eval()
    x = torch.randn(SMALL_INPUT)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(intermediates[-1], final)
    assert model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)[0].shape[1] == 64


def test_prune_intermediate_layers_keeps_requested_features():
    model = timm.create_model('dida_resnet18').eval()
    x = torch.randn(SMALL_INPUT)
    expected = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    model.prune_intermediate_layers(indices=[3])
    torch.testing.assert_close(model.forward_intermediates(x, indices=[3], intermediates_only=True)[0], expected)


@pytest.mark.parametrize('output_stride', [8, 16])
def test_output_stride_dilates_layer4_and_keeps_branch_aligned(output_stride):
    model = timm.create_model('dida_resnet18', output_stride=output_stride).eval()
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 64 // output_stride, 64 // output_stride)
    assert model.layer4.branch[0].dida.stride == 1


def test_branch_placement_and_depth_options():
    model = timm.create_model('dida_resnet50', dida_stages=(1, 3), branch_depth=1)
    assert [isinstance(getattr(model, f'layer{s}'), DidaStage) for s in (1, 2, 3, 4)] == [True, False, True, False]
    assert len(model.layer1.branch) == 1 and model.layer1.branch[0].dida.stride == 1
    assert model.layer3.branch[0].dida.stride == 2
    assert model(torch.randn(SMALL_INPUT)).shape == (2, 1000)
    with pytest.raises(ValueError, match='dida_stages'):
        timm.create_model('dida_resnet18', dida_stages=(5,))


def test_dida_module_options_reach_the_branch():
    model = timm.create_model('dida_resnet18', dida_reduction=8, dida_dilations=(1,), dida_dynamic=False)
    dida = model.layer4.branch[0].dida
    assert dida.reduced_chs == 256 // 8 and dida.dilations == (1,) and not dida.dynamic
    assert model(torch.randn(SMALL_INPUT)).shape == (2, 1000)


def test_group_matcher_puts_each_branch_after_its_stage_blocks():
    from timm.models._manipulate import group_parameters
    model = timm.create_model('dida_resnet18')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    group_of = {name: gid for gid, names in groups.items() for name in names}
    assert group_of['layer4.branch.0.dida.conv.weight'] > group_of['layer4.blocks.1.conv1.weight']
    assert group_of['layer4.blocks.1.conv1.weight'] > group_of['layer4.blocks.0.conv1.weight']
    assert group_of['fc.weight'] > group_of['layer4.branch.1.dida.fuse.weight']
    assert len(model.branch_parameters()) == sum(1 for n, _ in model.named_parameters() if '.branch.' in n)


@pytest.mark.parametrize('name', ['dida_resnet18', 'dida_convnext_atto', 'dida_regnety_004', 'dida_efficientnet_b0'])
def test_grad_checkpointing_keeps_outputs_and_gradients(name):
    # ResNet checkpoints per stage, ConvNeXt and RegNet flag each stage, EfficientNet checkpoints block by block
    model = timm.create_model(name).train()
    units = [m for m in model.modules() if isinstance(m, DidaModule)]
    calls = []
    for unit in units:
        unit.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(SMALL_INPUT)
    torch.manual_seed(0)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.branch_parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls.clear()
    torch.manual_seed(0)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert len(calls) == 2 * len(units)  # checkpointed: the backward ran every unit's forward again
    for p, grad in zip(model.branch_parameters(), grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-5)


def test_factory_kwargs_place_every_tensor():
    model = timm.create_model('dida_resnet18', device='meta', dtype=torch.float16)
    assert all(t.device.type == 'meta' and t.dtype == torch.float16 for t in model.parameters())


@pytest.mark.parametrize('name', ['dida_resnet18', 'dida_digitnet_compact'])
def test_channels_last_and_meta_built_models_compute_the_same(name):
    # train.py --channels-last converts the model, 4-D buffers included; a model built on meta tensors and
    # materialised with to_empty() gets its non-state buffers (the units' weight index) back from timm's
    # reinit_non_persistent_buffers, as timm's own models do
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(copy.deepcopy(model).to(memory_format=torch.channels_last)(x), expected)
        with torch.device('meta'):
            rebuilt = timm.create_model(name)
        rebuilt = rebuilt.to_empty(device='cpu').eval()
        rebuilt.load_state_dict(model.state_dict())
        units = reinit_non_persistent_buffers(rebuilt)
        assert units and all(isinstance(rebuilt.get_submodule(n), DidaModule) for n in units)
        torch.testing.assert_close(rebuilt(x), expected)


@pytest.mark.parametrize('name', ['dida_digitnet_compact', 'dida_resnet50', 'dida_convnext_atto'])
def test_timm_reparameterize_model_gives_an_inference_form_with_the_same_outputs(name):
    # timm's walk calls fuse() on any child with that attribute: it used to call the DIDA module's `fuse` conv with no
    # input (TypeError). The branch turns each unit into its inference form first: the module's stored conv weight,
    # a batch norm folded into the conv before it (bn after the module, bn2 after resnet50's 1x1), LayerNorm kept
    torch.manual_seed(0)
    size = 32 if 'digit' in name else 64
    model = timm.create_model(name, num_classes=5).train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size))  # running statistics that folding must use, not the initial ones
    model.eval()
    deployed = reparameterize_model(model)
    units = [unit for m in deployed.modules() if isinstance(m, DidaBranch) for unit in m]
    assert units and all(hasattr(unit.dida, 'paths_weight') for unit in units)
    batch_norms = 'convnext' not in name
    assert all(isinstance(unit.bn, torch.nn.Identity) == batch_norms for unit in units)
    assert all(isinstance(unit.bn2, torch.nn.Identity) for unit in units if hasattr(unit, 'bn2'))
    assert any(hasattr(unit, 'bn2') for unit in units) == (name == 'dida_resnet50')
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.jit.script(deployed)(x), deployed(x))
    # its folded norms keep no training history: never taken for an untrained branch and muted
    assert muted_if_untrained(reparameterize_model(timm.create_model(name))) is None


def test_torchscript_and_fx_match_eager():
    model = timm.create_model('dida_resnet18').eval()
    x = torch.randn(SMALL_INPUT)
    with timm.layers.set_layer_config(scriptable=True):
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager_for_several_batch_sizes():
    model = timm.create_model('dida_resnet18', num_classes=7).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch_size in (1, 7, 32):
            x = torch.randn(batch_size, 3, 64, 64)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('inference_form', [False, True])
def test_onnx_export_with_dynamic_batch_matches_eager(tmp_path, inference_form):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    model = timm.create_model('dida_resnet18', num_classes=7).eval()
    if inference_form:
        model = reparameterize_model(model)
    path = tmp_path / 'dida_resnet18.onnx'
    batch = torch.export.Dim('batch', min=1, max=64)
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), input_names=['input'],
                      dynamic_shapes={'x': {0: batch}}, dynamo=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch_size in (1, 5):
        x = torch.randn(batch_size, 3, 64, 64)
        (out,) = session.run(None, {'input': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['dida_digitnet', 'dida_digitnet_compact'])
def test_timms_onnx_export_of_the_digit_nets_matches_eager(tmp_path, name):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    from timm.utils.onnx import onnx_export
    model = timm.create_model(name).eval()
    path = tmp_path / f'{name}.onnx'
    onnx_export(model, str(path), batch_size=2)  # TorchScript tracing, dynamic batch
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch_size in (1, 5):
        x = torch.randn(batch_size, 3, 32, 32)
        (out,) = session.run(None, {'input0': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_digitnet_follows_the_m3sda_layout_with_a_620_parameter_dida_module():
    model = timm.create_model('dida_digitnet')
    static = timm.create_model('digitnet')
    assert sum(p.numel() for p in model.block3.branch[0].dida.parameters()) == 620
    assert not any('branch' in n for n, _ in static.named_parameters())
    assert [m.out_features for m in model.head.pre_logits if isinstance(m, torch.nn.Linear)] == [3072, 2048]
    x = torch.randn(3, 3, 32, 32)
    assert model.forward_features(x).shape == (3, 128, 8, 8) and model(x).shape == (3, 10)


def test_digitnet_branch_placement_and_depth_ablations():
    model = timm.create_model('dida_digitnet_compact', dida_blocks=(2, 3), branch_depth=2).eval()
    assert [len(model.block2.branch), len(model.block3.branch)] == [2, 2]
    assert model.block2.branch[0].dida.stride == 2 and model.block2.branch[1].dida.stride == 1
    x = torch.randn(3, 3, 32, 32)
    assert model.block2(model.block1(x)).shape == (3, 64, 8, 8) and model(x).shape == (3, 10)
    only2 = timm.create_model('dida_digitnet_compact', dida_blocks=(2,))
    assert isinstance(only2.block2, DidaStage) and not isinstance(only2.block3, DidaStage)
    # the default layout is unchanged, so published checkpoints keep loading
    assert timm.create_model('dida_digitnet_compact').state_dict().keys() == \
        timm.create_model('dida_digitnet_compact', dida_blocks=(3,), branch_depth=1).state_dict().keys()
    with pytest.raises(ValueError, match='dida_blocks'):
        timm.create_model('dida_digitnet_compact', dida_blocks=(1,))


def test_compact_digitnet_checkpoint_is_a_few_megabytes():
    for name in ('dida_digitnet_compact', 'digitnet_compact'):
        model = timm.create_model(name)
        size = len(safetensors.torch.save(model.state_dict()))
        assert size < 4 * 2 ** 20, f'{name}: {size / 2 ** 20:.1f} MiB'


def test_digitnet_features_include_the_branch():
    torch.manual_seed(0)
    model = timm.create_model('dida_digitnet_compact').eval()
    torch.manual_seed(0)
    features = timm.create_model('dida_digitnet_compact', features_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(x)[-1], model.forward_features(x))
    torch.nn.init.zeros_(model.block3.branch[0].bn.weight)
    torch.nn.init.zeros_(model.block3.branch[0].bn.bias)
    assert not torch.allclose(features(x)[-1], model.forward_features(x))


@pytest.mark.parametrize('name', ['dida_resnet18', 'dida_digitnet_compact'])
def test_layer_scale_zero_starts_as_the_static_twin_and_learns_its_scale(name):
    size = 32 if 'digit' in name else 64
    model = timm.create_model(name, num_classes=5, dida_layer_scale=0.0).eval()
    assert not any('scale' in n for n, _ in timm.create_model(name, num_classes=5).named_parameters())
    x = torch.randn(2, 3, size, size)
    out = model(x)
    stage = next(m for m in model.modules() if isinstance(m, DidaStage))
    with torch.no_grad():
        for n, p in stage.branch.named_parameters():
            if not n.endswith('scale.gamma'):
                p.add_(1.0)  # any branch weights: a zero scale hides them
    assert torch.equal(model(x), out)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    gamma = [p for n, p in model.named_parameters() if n.endswith('scale.gamma')]
    assert len(gamma) == 1 and gamma[0].grad.abs().sum() > 0


def test_digit_net_loads_its_static_twins_weights_with_a_fresh_branch(tmp_path):
    twin = timm.create_model('digitnet_compact')
    path = tmp_path / 'twin.safetensors'
    safetensors.torch.save_file(twin.state_dict(), str(path))
    model = timm.create_model('dida_digitnet_compact')
    load_checkpoint(model, str(path), filter_fn=static_twin_filter_fn)
    state = model.state_dict()
    for name, value in twin.state_dict().items():
        assert torch.equal(state[name.replace('block3.', 'block3.blocks.')], value), name
    other = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(timm.create_model('resnet18').state_dict(), str(other))
    with pytest.raises(RuntimeError, match='do not match the static network inside this DigitNet'):
        load_checkpoint(model, str(other), filter_fn=static_twin_filter_fn)


def test_a_dida_checkpoint_must_match_the_branch_even_when_the_class_count_changes(tmp_path):
    # with a new class count timm drops the classifier and loads the rest without its strict check: a branch that
    # did not match (another layout, an inference form) used to keep its random initialisation with a log line
    model = timm.create_model('dida_digitnet_compact', num_classes=5)
    for name, weights in [('deployed', reparameterize_model(timm.create_model('dida_digitnet_compact')).state_dict()),
                          ('deeper', timm.create_model('dida_digitnet_compact', branch_depth=2).state_dict())]:
        path = tmp_path / f'{name}.safetensors'
        safetensors.torch.save_file(weights, str(path))
        with pytest.raises(RuntimeError, match='do not match the network of this DigitNet') as error:
            timm.create_model('dida_digitnet_compact', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
        assert ('reparameterize' in str(error.value)) == (name == 'deployed')
    same = tmp_path / 'same.safetensors'
    safetensors.torch.save_file(timm.create_model('dida_digitnet_compact').state_dict(), str(same))
    loaded = timm.create_model('dida_digitnet_compact', pretrained=True, num_classes=5,
                               pretrained_cfg_overlay=dict(file=str(same)))
    assert loaded.get_classifier().out_features == 5 and model.state_dict().keys() == loaded.state_dict().keys()


def test_a_published_digit_checkpoint_gives_its_feature_map_with_global_pool_off():
    name = 'dida_digitnet_compact.offline_mnistm_style'
    pooled = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    for num_classes in (0, 5):  # the feature map; a new per-location classifier on it
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, global_pool='').eval()
        assert torch.equal(model.forward_features(x), pooled.forward_features(x))
        assert model(x).shape == (2, num_classes or pooled.num_features, 8, 8)
    # the trained classifier reads the pooled head's hidden layers: there is none to read here
    with pytest.raises(RuntimeError, match="global_pool='' builds a head without the checkpoint's hidden layers"):
        timm.create_model(name, pretrained=True, global_pool='')
    # hidden layers fed by another pooling would load a 2048-input fc into a 128-input one
    with pytest.raises(RuntimeError, match=r"global_pool='avg' gives the head's hidden layers other inputs .*"
                                           r"\(256, 2048\) in the checkpoint, \(256, 128\) here"):
        timm.create_model(name, pretrained=True, num_classes=0, global_pool='avg')


def _static_parts(model):
    from dida_timm.layers import DidaModule
    modules = [m for m in model.modules() if isinstance(m, DidaModule) and m.dynamic]
    assert modules
    return [v for m in modules for _, v in m.kernel_bases()]


def test_generated_kernels_start_purely_dynamic_in_every_model():
    # released code: branch convs kaiming-normal (fan_out, relu) with zero biases, so in K = g * u + v the
    # static part v is zero at initialisation
    for name in timm.list_models(module=['dida_resnet', 'dida_digitnet']):
        if not name.startswith('dida_'):
            continue
        model = timm.create_model(name)
        for v in _static_parts(model):
            assert torch.count_nonzero(v) == 0, name
        convs = [m for n, m in model.named_modules() if '.branch.' in f'.{n}.' and isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in convs), name


def test_loading_static_weights_keeps_the_fresh_branch_initialisation(tmp_path):
    path = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(timm.create_model('resnet18').state_dict(), str(path))
    model = timm.create_model('dida_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for v in _static_parts(model):
        assert torch.count_nonzero(v) == 0
    fuse = model.layer4.branch[0].dida.fuse.weight
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_chs * 1 * 1))
    assert fuse.std().item() == pytest.approx((2 / fuse.shape[0]) ** 0.5, rel=0.1)


@pytest.mark.parametrize('name,kwargs', [
    ('dida_digitnet_compact', {}), ('dida_resnet50', {}),  # the branch ends in bn / in conv -> bn2
    ('dida_resnet18', dict(dida_layer_scale=0.5)), ('dida_convnext_atto', {})])  # a scale; LayerNorm2d + GELU
def test_a_model_with_untrained_branches_is_muted_to_its_static_twin(name, kwargs):
    size = 32 if 'digit' in name else 64
    model = timm.create_model(name, num_classes=5, **kwargs)
    twin = timm.create_model(name.replace('dida_', ''), num_classes=5)
    model.load_state_dict(static_twin_filter_fn(twin.state_dict(), model))
    x = torch.randn(2, 3, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    muted = muted_if_untrained(model)
    assert muted is not model and muted is not None
    torch.testing.assert_close(muted.eval()(x), twin.eval()(x), rtol=0, atol=1e-5)
    # the model itself is untouched (its outputs can lie within 1e-4 of the twin's: a fresh branch is nearly silent)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.eval()(x), twin(x))
    model.train()(x)  # a train-mode forward moves the branch's BN statistics: it is no longer "as initialised"
    trained = muted_if_untrained(model)
    if 'convnext' in name:  # LayerNorm has no counters: its affine parameters tell
        assert trained is not None
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, DidaStage)).branch[0].bn.weight.add_(1e-3)
        trained = muted_if_untrained(model)
    assert trained is None
    assert muted_if_untrained(twin) is None  # no branch to mute


def test_a_branch_whose_last_activation_maps_zero_elsewhere_is_not_passed_off_as_muted():
    # a zero norm before a sigmoid still adds 0.5 everywhere: that model is not the static twin
    def stage(act_layer, layer_scale_init=None):
        return DidaStage(nn.Conv2d(8, 8, 3, padding=1),
                         DidaBranch(8, 8, 8, act_layer=act_layer, layer_scale_init=layer_scale_init, reduction=4))
    assert muted_if_untrained(nn.Sequential(stage(nn.Sigmoid))) is None
    assert muted_if_untrained(nn.Sequential(stage(nn.ReLU), stage(nn.Sigmoid))) is None
    for model in (nn.Sequential(stage(nn.GELU)), nn.Sequential(stage(nn.Sigmoid, layer_scale_init=1e-5))):
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(muted_if_untrained(model).eval()(x), model[0].blocks(x), rtol=0, atol=0)
