"""The DIDA unit's Triton kernels (dida_timm/layers/dida_triton.py): the same function and gradients as the eager
unit and the literal per-sample loop. Without a GPU they run in Triton's interpreter (tests/conftest.py)."""
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('triton')

import timm  # noqa: E402

from dida_timm.layers import DidaModule, dida_triton  # noqa: E402
from dida_timm.layers.dida_reference import dida_forward_per_sample  # noqa: E402
from test_dida_layer import _randomise, count_top_level_ops  # noqa: E402  (the latter from bench/bench_cost.py)

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture
def triton_dida():
    """Modules built inside the test use the kernels."""
    dida_triton.set_triton_dida(True)
    yield
    dida_triton.set_triton_dida(False)


def _pair(seed: int = 0, **kwargs) -> tuple:
    """The same randomised unit twice: with the kernels and eager."""
    dida_triton.set_triton_dida(True)
    try:
        fused = _randomise(DidaModule(32, 16, reduction=4, **kwargs), seed).to(DEVICE)
    finally:
        dida_triton.set_triton_dida(False)
    eager = _randomise(DidaModule(32, 16, reduction=4, **kwargs), seed).to(DEVICE)
    # the kernels really run (a CUDA tensor, or the interpreter that tests/conftest.py turns on), or every
    # comparison below would compare the eager unit with itself
    assert fused.use_triton and not eager.use_triton and dida_triton.triton_runs_on(torch.empty(0, device=DEVICE))
    return fused, eager


def _assert_same_parameter_grads(fused: DidaModule, eager: DidaModule) -> None:
    """The `.grad` of each parameter equals the eager unit's; a frozen parameter has none."""
    trained = [(name, p, p_ref) for (name, p), p_ref in zip(fused.named_parameters(), eager.parameters())
               if p.requires_grad]
    assert all(p.grad is None for p in fused.parameters() if not p.requires_grad)
    _assert_grads_close([p.grad for _, p, _ in trained], [p_ref.grad for _, _, p_ref in trained],
                        [name for name, _, _ in trained])


def _assert_grads_close(grads, grads_ref, names=None) -> None:
    """Gradients equal to the reference's, up to fp32 rounding on the scale of the unit's gradients.

    A generator's scalars a and c get the sum of every tap's kernel gradient over the batch, a sum that nearly
    cancels: two summation orders differ by rounding on the scale of its terms, not of its value (before this scale,
    30 inputs at 24 x 24 maps exceeded a plain atol of 1e-5 up to 1.3x, with the previous eager unit as well; 90 such
    inputs, three unit shapes, came to at most 0.22 of this tolerance).
    """
    scale = max(1., max(grad.abs().max().item() for grad in grads_ref))
    for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
        name = names[i] if names else str(i)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f'{name}: {m}')


def _outputs_and_grads(module: DidaModule, x: torch.Tensor) -> tuple:
    x = x.clone().requires_grad_()
    out = module(x)
    weights = torch.arange(out.numel(), device=out.device).view_as(out).sin()
    grads = torch.autograd.grad((out * weights).sum(), [x] + list(module.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilations, kernel_size', [
    ((1, 2), 3), ((1,), 3), ((2,), 3), ((2, 1), 3), ((2, 4), 3), ((1, 2), (1, 3)), ((1, 2), (3, 5)), ((1,), 5)])
def test_kernels_equal_the_eager_unit_and_the_per_sample_loop(stride, dilations, kernel_size):
    fused, eager = _pair(stride=stride, dilations=dilations, kernel_size=kernel_size)
    x = torch.randn(3, 32, 9, 10, device=DEVICE)  # odd and even sides, a ragged last block at stride 2
    out, grads = _outputs_and_grads(fused, x)
    out_ref, grads_ref = _outputs_and_grads(eager, x)
    assert (out - dida_forward_per_sample(eager, x)).abs().max().item() <= 1e-5
    assert (out - out_ref).abs().max().item() <= 1e-5
    _assert_grads_close(grads, grads_ref, ['input'] + [name for name, _ in fused.named_parameters()])


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilations, kernel_size', [((1, 2), 3), ((2, 4), (3, 5))])
def test_kernels_loop_over_maps_larger_than_one_block(stride, dilations, kernel_size):
    # 24 x 24 = 576 positions: the kernels' loops over blocks (256 positions at 3x3, 128 once a path has 5x5 taps)
    # run three or five times, the last one ragged
    fused, eager = _pair(seed=1, stride=stride, dilations=dilations, kernel_size=kernel_size)
    x = torch.randn(2, 32, 24, 24, device=DEVICE)
    out, grads = _outputs_and_grads(fused, x)
    out_ref, grads_ref = _outputs_and_grads(eager, x)
    assert (out - out_ref).abs().max().item() <= 1e-5
    _assert_grads_close(grads, grads_ref)


def test_pooled_code_gradient_follows_relu_at_negative_means():
    # channels whose mean is negative get no code gradient (g = ReLU(mean)), the others do
    fused, eager = _pair(seed=2)
    x = torch.randn(4, 32, 6, 6, device=DEVICE)
    x[:2] -= 2.
    codes = eager.kernel_codes(x)[0]
    assert (codes == 0).any() and (codes > 0).any()  # both sides of the ReLU occur
    _, grads = _outputs_and_grads(fused, x)
    _, grads_ref = _outputs_and_grads(eager, x)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_stays_within_bfloat16_precision():
    torch.manual_seed(0)
    fused, eager = _pair()
    x = torch.randn(4, 32, 9, 9, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads = _outputs_and_grads(fused, x)
    reference = dida_forward_per_sample(eager, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    # gradients: off the fp32 ones by about as much as the eager unit's under the same autocast (bf16 sums make
    # some, e.g. the fuse bias's, 9% off for both). Not the generators' scalars a and c (conv_k*): their gradients
    # sum every (sample, channel, position, tap) term and cancel to near zero, so the rounding of the bf16 inputs
    # moves them by up to their size (the eager unit's were 0-113% off fp32 over 60 inputs); the next test checks
    # the kernels' own arithmetic for them.
    _, grads_fp32 = _outputs_and_grads(eager, x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, grads_eager = _outputs_and_grads(eager, x)
    names = ['input'] + [name for name, _ in fused.named_parameters()]
    checked = 0
    for name, grad, grad_eager, grad_fp32 in zip(names, grads, grads_eager, grads_fp32):
        assert grad.dtype == grad_fp32.dtype  # parameters' gradients stay fp32, the input's too
        if name.startswith(('conv_k.', 'conv_k2.')):
            continue
        scale = grad_fp32.abs().max()
        error, eager_error = (grad - grad_fp32).abs().max() / scale, (grad_eager - grad_fp32).abs().max() / scale
        assert error <= 2 * eager_error + 1e-2, f'{name}: {error:.4f} off fp32, the eager unit {eager_error:.4f}'
        checked += 1
    assert checked == len(names) - 4


@pytest.mark.parametrize('dtype, step', [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
def test_half_precision_kernels_add_no_error_beyond_the_rounding_of_what_they_store(dtype, step):
    """bf16 or fp16 in, the kernels compute in fp32: the generators' gradients equal those of the same values in
    fp32, the paths and the input gradient differ by their own rounding to the half type only (one step of it at
    most: the rounding mode of the cast may differ; the interpreter truncates to bf16)."""
    torch.manual_seed(0)
    fused, _ = _pair()
    pre = torch.randn(4, 8, 81, device=DEVICE).to(dtype)
    grad = torch.randn(4, 2, 8, 81, device=DEVICE).to(dtype)

    def run(pre: torch.Tensor, grad: torch.Tensor) -> tuple:
        pre = pre.clone().requires_grad_()
        generators = [t.detach().clone().requires_grad_() for t in fused.generator_tensors()]
        out = dida_triton.dynamic_paths(pre, generators, 9, 9, 1, [1, 2])
        out.backward(grad)
        return out, pre.grad, [t.grad for t in generators]

    out, pre_grad, generator_grads = run(pre, grad)
    out_fp32, pre_grad_fp32, generator_grads_fp32 = run(pre.float(), grad.float())
    assert out.dtype == pre_grad.dtype == dtype
    torch.testing.assert_close(out.float(), out_fp32, rtol=step, atol=0)
    torch.testing.assert_close(pre_grad.float(), pre_grad_fp32, rtol=step, atol=0)
    for grad_half, grad_fp32 in zip(generator_grads, generator_grads_fp32):
        torch.testing.assert_close(grad_half, grad_fp32, rtol=1e-6, atol=0)


def test_the_kernels_run_and_the_unit_runs_few_top_level_ops(triton_dida):
    module = DidaModule(64, 128, reduction=16).to(DEVICE).eval()
    x = torch.randn(8, 64, 16, 16, device=DEVICE)
    with torch.no_grad(), torch.profiler.profile() as prof:
        module(x)
    assert 'dida_timm::dynamic_paths' in {e.name for e in prof.events()}
    with torch.no_grad():
        # the two 1x1 convs, the operator between them and three views (the layouts the operator takes and gives)
        assert count_top_level_ops(lambda: module(x)) <= 6
        assert count_top_level_ops(lambda: module(x), views=False) <= 3
    x.requires_grad_()
    out = module(x)
    grad = torch.randn_like(out)
    # backward: the two convs' and the operator's (into fresh gradients: no accumulation into `.grad`)
    assert count_top_level_ops(lambda: torch.autograd.grad(out, [x, *module.parameters()], grad),
                               views=False) <= 3


def test_op_passes_torch_library_checks():
    pre = torch.randn(2, 4, 7 * 6, device=DEVICE)
    fused, _ = _pair(dilations=(1, 2), kernel_size=(1, 3))
    generators = [t.detach().requires_grad_() for t in fused.generator_tensors()]
    torch.library.opcheck(dida_triton.dynamic_paths_op, (pre.requires_grad_(), generators, 7, 6, 2, [1, 2]))


def test_unit_compiles_without_graph_breaks():
    fused, eager = _pair(seed=3)
    x = torch.randn(2, 32, 8, 8, device=DEVICE)
    compiled = torch.compile(fused, backend='aot_eager', fullgraph=True)
    out, grads = _outputs_and_grads(compiled, x)
    out_ref, grads_ref = _outputs_and_grads(eager, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize('kwargs', [dict(shared_reduction=False), dict(dynamic=False)])
def test_ablations_keep_the_eager_unit(triton_dida, kwargs):
    assert not DidaModule(32, 16, reduction=4, **kwargs).use_triton


def test_reparameterized_unit_leaves_the_kernels_for_its_stored_weight(triton_dida):
    # the kernels build the kernel basis from the generator parameters, which the inference form no longer has
    module = _randomise(DidaModule(32, 32, reduction=4)).to(DEVICE).eval()
    deployed = copy.deepcopy(module)
    deployed.reparameterize()
    assert module.use_triton and not deployed.use_triton
    x = torch.randn(2, 32, 7, 7, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), module(x), rtol=1e-5, atol=1e-5)


def test_torchscript_fx_and_jit_trace_keep_the_eager_unit(triton_dida):
    module = _randomise(DidaModule(32, 32, reduction=4)).to(DEVICE).eval()
    x = torch.randn(2, 32, 7, 7, device=DEVICE)
    scripted, traced = torch.jit.script(module), torch.fx.symbolic_trace(module)
    assert 'dynamic_paths' not in traced.code
    jit_traced = torch.jit.trace(module, x)  # a Python autograd.Function would be recorded as an unexportable PythonOp
    assert 'PythonOp' not in str(jit_traced.graph) and 'DynamicPaths' not in str(jit_traced.graph)
    for graph in (scripted, traced, jit_traced):
        torch.testing.assert_close(graph(x), module(x), rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused_not_silently_wrong():
    fused, _ = _pair()
    x = torch.randn(2, 32, 6, 6, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|double backward|not support'):
        grad.sum().backward()


def test_nan_propagates_like_the_eager_unit():
    # a diverging run must show NaN, not have the kernels' ReLU turn it into 0
    fused, eager = _pair()
    x = torch.randn(2, 32, 6, 6, device=DEVICE)
    x[0, :, 2, 3] = float('nan')
    out, out_ref = fused(x), eager(x)
    assert out_ref[0].isnan().any() and not out_ref[1].isnan().any()
    assert torch.equal(out.isnan(), out_ref.isnan())


def test_an_expanded_gradient_and_a_frozen_input_are_handled():
    # `.sum()` hands the unit a stride-0 gradient; an input without grad gets none, the parameters still do
    fused, eager = _pair()
    x = torch.randn(3, 32, 6, 6, device=DEVICE)
    for module in (fused, eager):
        module.zero_grad()
        module(x).sum().backward()
    _assert_same_parameter_grads(fused, eager)


def test_frozen_generators_get_no_gradient_and_the_rest_the_same():
    fused, eager = _pair()
    x = torch.randn(3, 32, 6, 6, device=DEVICE)
    for module in (fused, eager):
        for name, p in module.named_parameters():
            p.requires_grad_(not name.startswith('conv_k'))  # conv_kernel*, conv_k*: the generators
            p.grad = None
        module(x).square().sum().backward()
    _assert_same_parameter_grads(fused, eager)


def test_model_with_kernels_trains_like_the_eager_model(triton_dida):
    # train mode (batch statistics in every BN), no dropout so that the two forwards can be compared
    fused = timm.create_model('dida_digitnet_compact', drop_rate=0.).to(DEVICE)
    dida_triton.set_triton_dida(False)
    eager = timm.create_model('dida_digitnet_compact', drop_rate=0.).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    assert [m.use_triton for m in fused.modules() if isinstance(m, DidaModule)] == [True]
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    exact = copy.deepcopy(eager).double()
    out, grads = _outputs_and_grads(fused, x)
    out_ref, grads_ref = _outputs_and_grads(eager, x)
    _, grads_exact = _outputs_and_grads(exact, x.double())
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    # The kernels' unit runs its 1x1s as convs, the eager unit as matmuls: sums in other orders. Where a gradient is
    # a sum that nearly cancels (a bias followed by a batch-statistics BN has a true gradient of zero; a branch
    # whose BN cancels what the fuse's weights do), fp32 gets it only to rounding on the scale of the summed terms,
    # and batch statistics of 4 images amplify that: on an H200 the two fp32 models differed by 4e-4 of the
    # gradient scale in 60 of block3's 204,800 conv weights. So each fp32 model is measured against the eager model
    # in float64, and the kernels' model must be about as close to it as the eager fp32 model (on a CPU, 30 seeds
    # of the earlier direct comparison came to at most 0.13 of the floor below)
    scale = max(grad.abs().max() for grad in grads_exact).item()
    names = ['input'] + [name for name, _ in fused.named_parameters()]
    for name, grad, grad_ref, grad_exact in zip(names, grads, grads_ref, grads_exact):
        error = (grad.double() - grad_exact).abs().max().item()
        error_ref = (grad_ref.double() - grad_exact).abs().max().item()
        assert error <= 2 * error_ref + 1e-4 * scale, (name, error, error_ref, scale)


def test_gpu_compiler_takes_every_launch(tmp_path):
    """Triton's GPU compiler, not only its interpreter, takes the launches of several unit shapes: compiled for sm_90
    (an H100/H200) down to a cubin with the ptxas Triton ships, in a subprocess, since a compiler crash ends its
    process; no launch spills registers, nor uses all 255 a thread may have (a launch at that cap spilled under
    another Triton: the two-path 7x7 backward on 4 warps, at 255 registers under Triton 3.8, spilled 28 bytes under
    3.6). This caught an LLVM crash (SLP vectorizer) that the interpreted tests could not see."""
    import triton
    from triton._C import libtriton
    if not hasattr(libtriton, 'native_specialize_impl'):  # the script specialises arguments as Triton >= 3.6 does
        pytest.skip(f'tests/triton_compile.py needs Triton >= 3.6 (its argument specialisation), got '
                    f'{triton.__version__}')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_CACHE_DIR'] = str(tmp_path)  # compile afresh, not from an earlier run's cache
    script = Path(__file__).with_name('triton_compile.py')
    proc = subprocess.run([sys.executable, str(script), '--arch', '90'], env=env, capture_output=True, text=True,
                          timeout=600)
    last = proc.stdout.strip().splitlines()[-1:] or ['(nothing printed)']
    assert proc.returncode == 0, f'exit {proc.returncode} at: {last[0]}\n{proc.stderr[-3000:]}'
    # every launch of the 11 unit shapes in fp32 and bf16 (the count of distinct specialisations varies with Triton)
    summary = re.fullmatch(r'compiled 66 launches \(\d+ distinct\); register spills: none; most registers a thread: '
                           r'(\d+)', last[0])
    assert summary and int(summary.group(1)) < 255, last[0]


def test_enabling_without_triton_is_refused(monkeypatch):
    monkeypatch.setattr(dida_triton, '_HAS_TRITON', False)
    with pytest.raises(RuntimeError, match='triton'):
        dida_triton.set_triton_dida(True)


def test_kernels_refuse_a_tensor_they_cannot_run_on(monkeypatch):
    monkeypatch.setattr(dida_triton, '_INTERPRET', False)
    pre = torch.randn(2, 4, 36)
    generators = DidaModule(32, 16, reduction=8).generator_tensors()
    for op in (dida_triton.dynamic_paths, dida_triton.dynamic_paths_op):
        with pytest.raises(RuntimeError, match='CUDA tensor'):
            op(pre, generators, 6, 6, 1, [1, 2])


def test_a_map_of_the_wrong_size_is_refused():
    generators = DidaModule(32, 16, reduction=8).generator_tensors()
    for op in (dida_triton.dynamic_paths, dida_triton.dynamic_paths_op):
        with pytest.raises(ValueError, match=r'\[N, r, 36\]'):
            op(torch.randn(2, 4, 35, device=DEVICE), generators, 6, 6, 1, [1, 2])


def test_kernels_launch_on_the_gpu_of_their_tensors(monkeypatch):
    # Triton launches on the current CUDA device: a unit on cuda:1 while cuda:0 is current must switch to cuda:1
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # a tensor on a second GPU, on any machine
        on_second_gpu = torch.empty(2, device='cuda:1')
    guard = dida_triton._on_device_of(on_second_gpu)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    # and every launch runs inside that guard, forward and backward
    entered = []
    guard_of = dida_triton._on_device_of
    monkeypatch.setattr(dida_triton, '_on_device_of', lambda t: entered.append(t) or guard_of(t))
    fused, _ = _pair()
    x = torch.randn(2, 32, 6, 6, device=DEVICE, requires_grad=True)
    fused(x).sum().backward()
    assert len(entered) == 2 and all(t.shape == (2, 8, 36) for t in entered)


def test_a_float64_unit_keeps_the_eager_unit_and_its_precision():
    # the kernels compute in fp32: a float64 unit on them got fp32 precision in a float64 tensor
    fused, eager = _pair()
    fused, eager = fused.double(), eager.double()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64, device=DEVICE)
    assert not dida_triton.triton_runs_on(x)
    torch.testing.assert_close(fused(x), dida_forward_per_sample(eager, x), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match='float64'):
        dida_triton.dynamic_paths(torch.randn(2, 8, 36, dtype=torch.float64, device=DEVICE),
                                  fused.generator_tensors(), 6, 6, 1, [1, 2])


def test_a_channels_last_model_on_the_kernels_gives_the_same_function():
    # train.py --channels-last converts the model: the fuse conv then writes channels-last
    fused, eager = _pair()
    fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 6, 6, device=DEVICE)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out, grads = _outputs_and_grads(fused, inp)
        out_ref, grads_ref = _outputs_and_grads(eager, inp)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
        _assert_grads_close(grads, grads_ref)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_torch_func_transforms_run_the_eager_unit_under_a_kernel_unit():
    # the kernels' autograd Function has no vmap or forward-mode rule: per-sample gradients (vmap(grad)) and jvp failed
    fused, eager = _pair(seed=4)
    params = [{name: p.detach() for name, p in m.named_parameters()} for m in (fused, eager)]
    x = torch.randn(3, 32, 6, 6, device=DEVICE)

    def per_sample_grads(module, p):
        def loss(p, sample):
            return torch.func.functional_call(module, p, (sample[None],)).square().mean()
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, x)

    got, expected = per_sample_grads(fused, params[0]), per_sample_grads(eager, params[1])
    _assert_grads_close([got[k] for k in expected], list(expected.values()), list(expected))
    tangent = torch.ones_like(x)
    torch.testing.assert_close(torch.func.jvp(fused, (x,), (tangent,)), torch.func.jvp(eager, (x,), (tangent,)),
                               rtol=1e-5, atol=1e-5)
