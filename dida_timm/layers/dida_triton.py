"""The DIDA unit's dynamic paths as one operator backed by Triton kernels (opt-in).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

Eager on a GPU, the unit's cost is launches, not arithmetic: between its two 1x1 convs it runs a dozen small ops
each way. `dynamic_paths` does that span in one kernel forward (ReLU, pooling, code, kernel generation, every
dilation path's depthwise conv, written in the fuse's input layout) and two backward, for the paper's unit
(dynamic kernels from the shared reduction). It is an opt-in, as timm's experimental fused attention is:
`set_triton_dida(True)` or the environment variable `DIDA_TRITON=1` (read when dida_timm is imported); either applies
to the `DidaModule`s built from then on. Modules fall back to the eager unit where the kernels cannot run (a CPU
tensor, a float64 one, TorchScript, FX and `torch.jit.trace` tracing); with `TRITON_INTERPRET=1` Triton runs them
on CPU tensors through its interpreter, which is how they are tested without a GPU.

Eager calls go through a lean autograd.Function; under torch.compile the same launches run as the custom op
`dida_timm::dynamic_paths` (opaque to the compiler, its shapes and autograd registered).
"""
import contextlib
import importlib.util
import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['dynamic_paths', 'dynamic_paths_op', 'set_triton_dida', 'triton_runs_on', 'use_triton_dida']

_USE_TRITON = os.environ.get('DIDA_TRITON', '0') == '1'
_HAS_TRITON = importlib.util.find_spec('triton') is not None
# read once, as Triton reads it when the kernels are defined
_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
# the most values a [taps, positions] tile of the kernels holds (its positions, BLOCK, are capped to fit)
_TILE_VALUES = 4096
if _USE_TRITON and not _HAS_TRITON:
    warnings.warn('DIDA_TRITON=1 but the triton package is missing: DIDA units run eager')


def set_triton_dida(enable: bool = True) -> None:
    """Build `DidaModule`s that run their dynamic paths with the Triton kernels (modules built from now on)."""
    global _USE_TRITON
    if enable and not _HAS_TRITON:
        raise RuntimeError('set_triton_dida(True) needs the triton package (it ships with torch\'s CUDA wheels)')
    _USE_TRITON = enable


def use_triton_dida() -> bool:
    """Whether new `DidaModule`s use the Triton kernels."""
    return _USE_TRITON and _HAS_TRITON


# the kernels load, compute and reduce in fp32: a float64 unit would get fp32 precision in a float64 tensor
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_runs_on(x: Tensor) -> bool:
    """Whether the kernels can run on `x`: a CUDA tensor, or any tensor under Triton's interpreter, of a dtype they
    keep the precision of (not float64); never an FX proxy nor under `torch.jit.trace` (a traced graph keeps the
    eager unit, which it can record and export), nor inside a `torch.func` transform (`vmap(grad(...))` for per-sample
    gradients, `jvp`: their autograd Function has no vmap or forward-mode rule, the eager unit runs under them)."""
    return (_HAS_TRITON and isinstance(x, Tensor) and (x.is_cuda or _INTERPRET) and x.dtype in _KERNEL_DTYPES
            and not torch.jit.is_tracing()
            and (torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(x)))


def output_size(height: int, width: int, stride: int) -> Tuple[int, int]:
    """The paths' map size H', W' = ceil(H / stride), ceil(W / stride): each path pads by dilation * (k - 1) / 2."""
    return (height - 1) // stride + 1, (width - 1) // stride + 1


def _padded(generators: List[Tensor]) -> List[Tensor]:
    """The kernels take two paths' generator parameters: a one-path unit passes its own twice (never read)."""
    return generators if len(generators) == 8 else generators * 2


def _constants(generators: List[Tensor], stride: int, dilations: Sequence[int], size: int) -> dict:
    import triton
    kernel_sizes = [math.isqrt(generators[i].numel()) for i in (0, 4)[:len(dilations)]]
    kernel_sizes, dilations = kernel_sizes * (3 - len(kernel_sizes)), list(dilations) * (3 - len(dilations))
    taps = [triton.next_power_of_2(k * k) for k in kernel_sizes]
    return dict(
        STRIDE=stride, PATHS=len(generators) // 4,
        KSIZE1=kernel_sizes[0], DILATION1=dilations[0], TAPS1=taps[0],
        KSIZE2=kernel_sizes[1], DILATION2=dilations[1], TAPS2=taps[1],
        # [taps, positions] tiles of at most _TILE_VALUES (32 a thread of 4 warps): at 14 x 14 maps this took the 5x5
        # and 7x7 kernels' backward from 238-246 registers a thread to 164-168 (ptxas, sm_90, fp32); 3x3 unchanged
        BLOCK=min(max(triton.next_power_of_2(size), 16), _TILE_VALUES // max(taps)),
    )


def _check(pre: Tensor, generators: List[Tensor], height: int, width: int, dilations: Sequence[int]) -> None:
    if len(generators) != 4 * len(dilations) or len(dilations) not in (1, 2):
        raise ValueError(f'dynamic_paths takes 4 generator tensors per dilation, got {len(generators)} for '
                         f'dilations {list(dilations)}')
    if pre.dim() != 3 or pre.shape[2] != height * width:
        raise ValueError(f'dynamic_paths: pre must be [N, r, height * width] = [N, r, {height * width}], got '
                         f'{list(pre.shape)}')
    if not triton_runs_on(pre):
        raise RuntimeError(f'the Triton DIDA kernels need a CUDA tensor (or TRITON_INTERPRET=1) of float32, float16 or '
                           f'bfloat16, got {pre.dtype} on {pre.device}')


def _on_device_of(tensor: Tensor):
    """A context in which Triton launches on `tensor`'s GPU and stream: Triton launches on the current CUDA device,
    so a unit on cuda:1 while cuda:0 is current would run its kernels on cuda:0 against cuda:1's memory."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch_forward(
        pre: Tensor, generators: List[Tensor], height: int, width: int, stride: int, dilations: Sequence[int],
) -> Tuple[Tensor, Tensor]:
    from . import _dida_kernels
    _check(pre, generators, height, width, dilations)
    pre = pre.contiguous()
    n, r, _ = pre.shape
    out_height, out_width = output_size(height, width, stride)
    out = pre.new_empty(n, len(dilations), r, out_height * out_width)
    code = pre.new_empty(n, r, dtype=torch.float32)
    with _on_device_of(pre):
        _dida_kernels.dynamic_paths_forward[(n * r,)](
            pre, out, code, *_padded(generators), r, height, width, out_width, out_height * out_width,
            **_constants(generators, stride, dilations, height * width))
    return out, code


def _launch_backward(
        grad: Tensor, pre: Tensor, code: Tensor, generators: List[Tensor], height: int, width: int, stride: int,
        dilations: Sequence[int], with_generator_grads: bool = True,
) -> Tuple[Tensor, List[Optional[Tensor]]]:
    from . import _dida_kernels
    _check(pre, generators, height, width, dilations)
    pre = pre.contiguous()
    n, r, _ = pre.shape
    out_height, out_width = output_size(height, width, stride)
    constants = _constants(generators, stride, dilations, height * width)
    pre_grad = torch.empty_like(pre)
    kernel_grad = pre.new_empty(n * r, sum(generators[i].numel() for i in range(0, len(generators), 4)),
                                dtype=torch.float32)
    padded = _padded(generators)
    # 8 warps where the [taps, positions] tiles are full (_TILE_VALUES), as the backward holds several: at 4 warps
    # Triton 3.6 (torch 2.11's) gave it 255 registers a thread and spilled in 5 of tests/triton_compile.py's 66
    # launches; at 8 none spilled, under Triton 3.6 and 3.8, at 180 registers at most (ptxas, sm_90)
    warps = 8 if max(constants['TAPS1'], constants['TAPS2']) * constants['BLOCK'] >= _TILE_VALUES else 4
    with _on_device_of(pre):
        _dida_kernels.dynamic_paths_backward[(n * r,)](
            pre, grad.contiguous(), code, pre_grad, kernel_grad, *padded,
            r, height, width, out_height, out_width, num_warps=warps, **constants)
        if not with_generator_grads:  # frozen generators: the per-row kernel gradients were needed for dL/dg only
            return pre_grad, [None] * len(generators)
        generator_grads = [torch.empty_like(g) for g in generators]
        # 64 rows of the [N * r, taps] kernel gradients a step: [64, taps] tiles, as small as the kernels' others
        _dida_kernels.generator_grads[(constants['PATHS'],)](
            kernel_grad, code, *padded[0:3], *padded[4:7], *_padded(generator_grads), n * r,
            PATHS=constants['PATHS'], KSIZE1=constants['KSIZE1'], TAPS1=constants['TAPS1'],
            KSIZE2=constants['KSIZE2'], TAPS2=constants['TAPS2'], ROWS=64)
    return pre_grad, generator_grads


def _op_range(name: str):
    """A profiler range naming the launch like an operator (what the profiler shows and bench_cost counts), opened
    only while a profiler runs: an open range costs about as much as the rest of the call."""
    if torch.autograd.profiler._is_profiler_enabled:  # private; torch.compile's runtime checks it the same way
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class _DynamicPaths(torch.autograd.Function):
    """The eager form. Per call with autograd on, an autograd.Function took 7 us, the custom op's autograd wrapper
    (which only torch.compile needs) 34 us (CPU, torch 2.14.1, trivial bodies): call overhead is what the kernels
    are there to remove."""

    @staticmethod
    def forward(ctx, pre: Tensor, height: int, width: int, stride: int, dilations: List[int], *generators: Tensor):
        generators = list(generators)
        with _op_range('dida_timm::dynamic_paths'):
            out, code = _launch_forward(pre, generators, height, width, stride, dilations)
        ctx.shape = height, width, stride, dilations
        ctx.save_for_backward(pre, code, *generators)
        ctx.mark_non_differentiable(code)
        ctx.set_materialize_grads(False)  # the codes' gradient is never used: no tensor of zeros for it
        return out, code

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no backward: a double backward is refused
    def backward(ctx, grad: Tensor, code_grad: Optional[Tensor]):
        pre, code, *generators = ctx.saved_tensors
        with _op_range('dida_timm::dynamic_paths_backward'):
            pre_grad, generator_grads = _launch_backward(grad, pre, code, generators, *ctx.shape,
                                                         with_generator_grads=any(ctx.needs_input_grad[5:]))
        return (pre_grad, None, None, None, None, *generator_grads)


def dynamic_paths(
        pre: Tensor, generators: List[Tensor], height: int, width: int, stride: int, dilations: List[int],
) -> Tensor:
    """Every dynamic path of a DIDA unit with shared reduction, from the reduction conv's output.

    Args:
        pre: The 1x1 reduction's output before its ReLU, [N, r, H * W].
        generators: Per dilation `conv_kernel.weight`, `conv_kernel.bias`, `conv_k.weight`, `conv_k.bias`.
        height: H.
        width: W.
        stride: Stride of the depthwise convs.
        dilations: One per path; each path pads by dilation * (k - 1) / 2.

    Returns:
        The paths [N, paths, r, H' * W'], in `pre`'s dtype.
    """
    if torch.compiler.is_compiling():
        return dynamic_paths_op(pre, generators, height, width, stride, dilations)[0]
    return _DynamicPaths.apply(pre, height, width, stride, dilations, *generators)[0]


@torch.library.custom_op('dida_timm::dynamic_paths', mutates_args=())
def dynamic_paths_op(
        pre: Tensor, generators: List[Tensor], height: int, width: int, stride: int, dilations: List[int],
) -> Tuple[Tensor, Tensor]:
    """`dynamic_paths` as a custom op for torch.compile (opaque to it, with its shapes and autograd registered):
    the paths and the codes g [N, r] (fp32, saved for backward)."""
    return _launch_forward(pre, generators, height, width, stride, dilations)


@dynamic_paths_op.register_fake
def _(pre, generators, height, width, stride, dilations):
    n, r, _ = pre.shape
    out_height, out_width = output_size(height, width, stride)
    return pre.new_empty(n, len(dilations), r, out_height * out_width), pre.new_empty(n, r, dtype=torch.float32)


@torch.library.custom_op('dida_timm::dynamic_paths_backward', mutates_args=())
def dynamic_paths_backward_op(
        grad: Tensor, pre: Tensor, code: Tensor, generators: List[Tensor], height: int, width: int, stride: int,
        dilations: List[int],
) -> Tuple[Tensor, List[Tensor]]:
    """Gradients of `dynamic_paths_op` for `pre` and the generator tensors, from the paths' gradient `grad`."""
    return _launch_backward(grad, pre, code, generators, height, width, stride, dilations)


@dynamic_paths_backward_op.register_fake
def _(grad, pre, code, generators, height, width, stride, dilations):
    return pre.new_empty(pre.shape), [torch.empty_like(g) for g in generators]


def _setup_context(ctx, inputs, output) -> None:
    pre, generators, ctx.height, ctx.width, ctx.stride, ctx.dilations = inputs
    ctx.save_for_backward(pre, output[1], *generators)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad: Tensor, code_grad: Optional[Tensor]):
    pre, code, *generators = ctx.saved_tensors
    pre_grad, generator_grads = dynamic_paths_backward_op(
        grad, pre, code, generators, ctx.height, ctx.width, ctx.stride, ctx.dilations)
    return pre_grad, generator_grads, None, None, None, None


dynamic_paths_op.register_autograd(_backward, setup_context=_setup_context)
