"""The DIDA module: a dynamic instance adaptation unit.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028
(Deng, Zhou, Li, He, Song, Xiang; IEEE T-IP 2022).

The module reduces the input X [N, C, H, W] to r = C // m channels with a 1x1 conv, generates one k x k
kernel per (sample, channel) from the globally pooled input through the SAME 1x1 conv, convolves each
reduced channel depthwise with its own kernel, and fuses the result back to P channels with a shared 1x1
conv, once per dilation; the dilation outputs are concatenated.

    F = ReLU(conv(X)),  g = ReLU(conv(GAP(X))),  K[n, j] = a * (g[n, j] * u0 + v0) + c = g[n, j] * u + v

Because K is affine in g, the dynamic depthwise conv factors into static convs and a per-(sample, channel) blend:

    O[n, j] = v * F[n, j] + g[n, j] * (u * F[n, j])

so the forward has no loop over the batch and no batch-size-dependent groups. Every path runs in ONE grouped conv
(per reduced channel, one output per basis kernel v, u and path, each path's kernels embedded in a common S x S
window, the whole weight one gather and one multiply-add of the generator parameters) and one multiply-add; the
fuse runs on all paths at once and writes the concatenated output directly. The two 1x1 convs are batched matmuls on
CPU, convs elsewhere. On a GPU, everything between the two 1x1 convs can instead run as one Triton kernel (opt-in,
`dida_triton.py`). For inference, `reparameterize` (timm's `reparameterize_model`) stores the grouped conv's weight.

Parameter names (`conv`, `conv_kernel`, `conv_kernel2`, `conv_k`, `conv_k2`, `fuse`) follow the authors'
released code so that checkpoints stay convertible. Differences from that code: the generator is never
detached (gradients reach `conv_kernel*`, `conv_k*` and `conv`), and the ablations of the paper (static
kernels, unshared reduction convs, one dilation, a 1x1 kernel on the dilation-1 path) are options.
"""
import collections.abc
import math
import numbers
from typing import Any, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dida_triton import dynamic_paths, output_size, triton_runs_on, use_triton_dida

__all__ = ['DidaModule', 'kernel_basis']


def _option(name: str) -> str:
    """A DidaModule argument as messages name it, with the kwarg users set on a model (add_dida takes `name`)."""
    return f"{name} (a model's dida_{name})"


def _positive_ints(values: Sequence[Any]) -> bool:
    """Whether every value is an integer >= 1 (Python's or numpy's; not a bool, not a float)."""
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values)


def _values(value: Any) -> Optional[Tuple[Any, ...]]:
    """An option given as one number or as several (a list, tuple or numpy array), as a tuple; None for anything
    else (a string, None)."""
    if isinstance(value, numbers.Number):
        return (value,)
    if isinstance(value, str) or not isinstance(value, collections.abc.Iterable):
        return None
    return tuple(value)


def _per_dilation(value: Union[int, Sequence[int]], num: int, name: str) -> Tuple[int, ...]:
    values = (value,) * num if isinstance(value, numbers.Number) else _values(value)
    if values is None or len(values) != num:
        raise ValueError(f'{name} must be an int or have one entry per dilation ({num}), got {value!r}')
    return values


def kernel_basis(
        kernel_weight: torch.Tensor,
        kernel_bias: Optional[torch.Tensor],
        scale_weight: torch.Tensor,
        scale_bias: Optional[torch.Tensor],
        kernel_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold a generator (1 -> k*k conv, then scalar affine) into (u, v), the kernel of code g being g * u + v.

    Args:
        kernel_weight: `conv_kernel.weight`, [k*k, 1, 1, 1] (u0).
        kernel_bias: `conv_kernel.bias`, [k*k] (v0).
        scale_weight: `conv_k.weight`, [1, 1, 1, 1] (a).
        scale_bias: `conv_k.bias`, [1] (c).
        kernel_size: k.

    Returns:
        u and v, each [k, k].
    """
    assert kernel_bias is not None and scale_bias is not None  # the generator convs always have biases
    a = scale_weight.reshape(())
    u = a * kernel_weight.reshape(kernel_size, kernel_size)
    v = a * kernel_bias.reshape(kernel_size, kernel_size) + scale_bias.reshape(())
    return u, v


@torch.fx.wrap  # an FX graph calls it, so the form follows the device the graph runs on
def pointwise_conv(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """A 1x1 conv with bias (`weight` [O, C / groups, 1, 1], `bias` [O]) of `x` [B, C, H, W]: [B, O, H, W].

    On CPU one batched matmul (`pointwise_matmul`); elsewhere `F.conv2d`, one dispatch where the matmul and its views
    take six (and one backward where the matmul takes four): eager on a GPU, the unit's cost is dispatches.
    """
    if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != weight.shape[1] * groups):
        # the matmul's own error names its batch2 operand, not the input's channels
        raise ValueError(f'DidaModule expects input [N, {weight.shape[1] * groups}, H, W], got {list(x.shape)}')
    if x.is_cpu:
        return pointwise_matmul(x, weight, bias, groups)
    return F.conv2d(x, weight, bias, groups=groups)


def pointwise_matmul(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """`pointwise_conv` as one batched matmul (of B * groups matrices), its CPU form.

    The branch's 1x1 convs have few input (fuse: C/16) or output (reduce: C/16) channels, where oneDNN's conv is at
    its slowest: at the branch shapes of dida_digitnet_compact and dida_resnet18 (CPU, 2 threads, torch 2.14.1) this
    matmul took 0.33-0.97 of the conv's forward + backward time, 0.4 of it at batch 2 (per-call overhead). The
    grouped 1x1 of a reparameterized module's output, oneDNN's conv at batch 2, took 5x the matmul's time.
    """
    assert bias is not None  # the module's 1x1 convs always have biases
    n, c, h, w = x.shape
    rows = weight.shape[0] // groups
    if groups == 1:  # one weight for every sample: expanded, not copied
        batch_weight, batch_bias = weight.view(1, rows, -1).expand(n, -1, -1), bias.view(1, rows, 1)
    else:
        batch_weight = weight.view(groups, rows, -1).repeat(n, 1, 1)
        batch_bias = bias.view(groups, rows, 1).repeat(n, 1, 1)
    out = torch.baddbmm(batch_bias, batch_weight, x.reshape(n * groups, c // groups, h * w))
    return out.view(n, weight.shape[0], h, w)


@torch.fx.wrap  # FX would trace the parameters' `dim()` into control flow
def _generator_vector(generators: List[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """Every path's generator parameters (w, b, a, c, as `DidaModule.generator_tensors` lists them) and a zero, in one
    flat vector."""
    return torch.cat([t if t.dim() == 1 else t.view(-1) for t in generators] + [zero])


def _weight_index(reduced_chs: int, kernel_sizes: Tuple[int, ...], steps: Tuple[int, ...], window: int) -> torch.Tensor:
    """Where the factors x, y and the term z of each entry x * y + z of the grouped conv weight [r * 2 * paths, 1, S, S]
    are taken from in `_generator_vector`: the three indices stacked, [3 * r * 2 * paths, 1, S, S] (4-D, like the
    weight: a module converted to channels-last converts its 4-D buffers and cannot convert a 5-D one).

    Output channel (j, e, p) holds, in path p's taps, v = a * b + c for e = 0 and u = a * w for e = 1 (the generator's
    K(g) = a * (g * w + b) + c = g * u + v); zeros elsewhere in the window.
    """
    zero = sum(2 * k * k + 2 for k in kernel_sizes)
    index = torch.full((3, 2, len(kernel_sizes), window, window), zero, dtype=torch.long)
    first = 0
    for path, (k, step) in enumerate(zip(kernel_sizes, steps)):
        taps = torch.arange(k * k).view(k, k)
        scale, shift = first + 2 * k * k, first + 2 * k * k + 1
        window_taps = slice((window - step * (k - 1) - 1) // 2, None, step)
        for e, (factor, term) in enumerate([(first + k * k + taps, shift), (first + taps, zero)]):
            for i, value in enumerate((scale, factor, term)):
                index[i, e, path, window_taps, window_taps][:k, :k] = value
        first += 2 * k * k + 2
    index = index.view(3, 1, -1, window, window).expand(-1, reduced_chs, -1, -1, -1)
    return index.reshape(-1, 1, window, window)


@torch.fx.wrap  # an FX graph calls it, so the layout follows the device the graph runs on
def _grouped_conv_input(feat: torch.Tensor) -> torch.Tensor:
    """`feat` laid out for the paths' grouped conv: channels-last on CPU, unchanged elsewhere.

    oneDNN's grouped conv with several outputs per group is faster on channels-last input, this copy of the
    r-channel features included: the whole module's forward + backward took 5.1 instead of 5.9 ms in
    dida_digitnet_compact, 5.0 and 5.2 instead of 5.1 and 6.3 ms in dida_resnet18 (`bench/bench_branch_parts.py`, 2
    threads, torch 2.14.1). GPUs keep the layout they were measured with. The copy is made between two permutes, not by
    `contiguous(memory_format=...)`, which `torch.func.vmap` (per-sample gradients) does not take.
    """
    return feat.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if feat.is_cpu else feat


@torch.fx.wrap  # FX would trace the layout test into control flow
def _concatenated_paths(out: torch.Tensor, batch: int, num_paths: int) -> torch.Tensor:
    """The fuse's output on path-major rows, [N * paths, P / paths, H', W'], as the paths' concatenation [N, P, H', W'].

    A view when the conv wrote channels-first. A conv whose weight is channels-last (a model converted with
    `.to(memory_format=torch.channels_last)`, as `train.py --channels-last` does) writes channels-last, where a
    sample's paths are not adjacent: they are copied into a channels-last concatenation, the layout the model runs in.
    """
    chs, height, width = out.shape[1], out.shape[2], out.shape[3]
    if out.is_contiguous():
        return out.view(batch, num_paths * chs, height, width)
    return torch.cat(out.view(batch, num_paths, chs, height, width).unbind(1), 1)


class _FuseConv(nn.Conv2d):
    """The unit's shared fuse conv, an `nn.Conv2d` (the module reads its weight and bias; it never calls it).

    timm's `reparameterize_model` calls `fuse()` on every module with an attribute of that name: on a DidaModule
    outside a DidaBranch (or a branch given to it as the model) it calls this conv without an input, which then says
    what to do instead of failing on a missing argument.
    """

    def forward(self, input: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input is None:
            raise RuntimeError(
                "timm's reparameterize_model reached a DidaModule outside a DidaBranch (or a DidaBranch given to it "
                'as the model) and called its `fuse` conv: call the module\'s or branch\'s reparameterize() instead')
        return self._conv_forward(input, self.weight, self.bias)


class DidaModule(nn.Module):
    """Dynamic instance adaptation module (paper Fig. 3, docs/METHOD.md section 1).

    Args:
        in_chs: Input channels C.
        out_chs: Output channels P, split evenly across the dilation paths.
        stride: Stride of the dynamic depthwise conv.
        reduction: Channel reduction m, r = in_chs // m.
        dilations: One dynamic path per dilation, one or two of them (an int: one path).
        kernel_size: Kernel size of the generated kernels, an int or one per dilation (odd).
        shared_reduction: Use one 1x1 conv for the features and the kernel generators (paper), else one each.
        dynamic: Generate kernels per sample (DIDA); False learns static depthwise kernels (ablation).
    """
    dynamic: Final[bool]
    two_paths: Final[bool]
    shared_reduction: Final[bool]

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            reduction: int = 16,
            dilations: Union[int, Sequence[int]] = (1, 2),
            kernel_size: Union[int, Sequence[int]] = 3,
            shared_reduction: bool = True,
            dynamic: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        given, dilations = dilations, _values(dilations)
        if dilations is None:
            raise ValueError(f"{_option('dilations')} must be an int or a sequence of them, got {given!r}")
        for name, value in (('in_chs', in_chs), ('out_chs', out_chs)):
            if not _positive_ints((value,)):
                raise ValueError(f'DidaModule {name} must be a positive integer, got {value!r}')
        if not _positive_ints((stride,)):
            raise ValueError(f'DidaModule stride must be a positive integer, got {stride!r}')
        if not _positive_ints((reduction,)):
            raise ValueError(f"{_option('reduction')} must be a positive integer, got {reduction!r}")
        if not _positive_ints(dilations):
            raise ValueError(f"{_option('dilations')} must be positive integers, got {dilations!r}")
        if len(dilations) not in (1, 2):
            raise ValueError(f"DidaModule supports one or two {_option('dilations')}, got {dilations!r}")
        kernel_sizes = _per_dilation(kernel_size, len(dilations), _option('kernel_size'))
        if not _positive_ints(kernel_sizes) or any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"{_option('kernel_size')} must be odd positive integers, got {kernel_size!r}")
        # numpy integers as Python's
        dilations, kernel_sizes = tuple(map(int, dilations)), tuple(map(int, kernel_sizes))
        if out_chs % len(dilations):
            raise ValueError(
                f"out_chs ({out_chs}) must divide by the number of {_option('dilations')}, got {dilations!r} (one "
                f"dilation, e.g. dida_dilations=(1,), takes any out_chs)")
        if in_chs // reduction < 1:
            raise ValueError(
                f"{_option('reduction')} {reduction} leaves no channels of in_chs={in_chs} (at most {in_chs})")
        r = in_chs // reduction
        self.reduced_chs = r
        self.stride = stride
        self.dilations = dilations
        self.kernel_sizes = kernel_sizes
        self.paddings = tuple(d * (k - 1) // 2 for d, k in zip(dilations, kernel_sizes))
        self.dynamic = dynamic
        self.two_paths = len(dilations) == 2
        self.shared_reduction = shared_reduction or not dynamic
        # the Triton kernels implement the paper's unit (dynamic kernels from the shared reduction)
        self.use_triton = use_triton_dida() and dynamic and shared_reduction

        self.conv = nn.Conv2d(in_chs, r, 1, **dd)
        if dynamic:
            # generator: a 1 -> k*k map shared by every channel, then a scalar affine (released code)
            self.conv_kernel = nn.Conv2d(1, kernel_sizes[0] ** 2, 1, **dd)
            self.conv_k = nn.Conv2d(1, 1, 1, **dd)
            if self.two_paths:
                self.conv_kernel2 = nn.Conv2d(1, kernel_sizes[1] ** 2, 1, **dd)
                self.conv_k2 = nn.Conv2d(1, 1, 1, **dd)
            if not self.shared_reduction:
                self.conv_gen = nn.Conv2d(in_chs, r, 1, **dd)
                if self.two_paths:
                    self.conv_gen2 = nn.Conv2d(in_chs, r, 1, **dd)
        else:
            self.conv_kernel = self._static_kernel(r, kernel_sizes[0], dilations[0], dd)
            if self.two_paths:
                self.conv_kernel2 = self._static_kernel(r, kernel_sizes[1], dilations[1], dd)
        self.fuse = _FuseConv(r, out_chs // len(dilations), 1, **dd)
        if dynamic:
            # All paths run as one grouped conv: each path's kernels sit in a common S x S window, dilated by
            # dilation / conv_dilation (3x3 at dilations 1 and 2: a 5x5 window, the dilation-2 taps on its even rows
            # and columns). For speed: a unit ran 47 small aten ops, and eager on GPU that launch overhead was most of
            # the branch's cost (1.6-1.7x the static twin's step for +0.16% MACs). On CPU (forward + backward of the
            # depthwise conv alone, 1 thread, torch 2.14.1) the 5x5 conv also beat two 3x3 convs, one dilated: 10 vs
            # 13 ms at dida_digitnet_compact shapes, 9 vs 12 ms at dida_resnet18's; applying the code before the conv
            # (two inputs per channel) took 16-20 ms, a conv over the [N * r, 1, H, W] view 19-21 ms.
            self.conv_dilation = math.gcd(*dilations)
            steps = tuple(d // self.conv_dilation for d in dilations)
            self.window = max(s * (k - 1) + 1 for s, k in zip(steps, kernel_sizes))
            self.padding = self.conv_dilation * (self.window - 1) // 2
            # not state (not saved; cast and moved with the module): the grouped conv's weight is gathered through
            # `weight_index` from the generator parameters and `zero`, which fills the window outside the taps
            self.register_buffer('zero', torch.zeros(1, **dd), persistent=False)
            self.register_buffer('weight_index', torch.empty(0, dtype=torch.long, device=dd['device']),
                                 persistent=False)
            self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Build the buffers that are not state, on the device they are on: after `to_empty()` they hold whatever
        memory they got (timm's `reinit_non_persistent_buffers(model)` calls this on every module that has it)."""
        if not self.dynamic or hasattr(self, 'paths_weight'):
            return
        steps = tuple(d // self.conv_dilation for d in self.dilations)
        index = _weight_index(self.reduced_chs, self.kernel_sizes, steps, self.window)
        self.weight_index = index.to(self.weight_index.device)
        self.zero = torch.zeros_like(self.zero)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the inference form, in place: the same function of the input in fewer ops.

        A trained unit's grouped-conv weight depends on the generator parameters alone, so it is computed once and
        kept as the buffer `paths_weight` (the generator convs, `weight_index` and `zero` go), and the shared `fuse`
        conv becomes `proj`, one dense 1x1 conv holding a copy of it per path: it reads the paths in the
        channel-major layout the blend writes (input channel j * paths + p) and writes their concatenation, so the
        forward skips the weight's gather and multiply-add and the paths' re-layout copy (`proj` runs `paths` times
        the fuse's multiply-adds, zeros included). `DidaBranch.reparameterize` also folds the unit's batch norm into
        `proj`.

        timm's `reparameterize_model` reaches it through `DidaBranch`: that walk calls `fuse()` on any module with
        an attribute of that name, so the inference form has none, and a module outside a branch (or given to timm
        as the model) must be reparameterized by this call. The kernel basis is a constant from then on (train
        first); the Triton kernels, which build the basis themselves, are off.
        """
        if hasattr(self, 'proj'):
            return
        if self.dynamic:
            self.register_buffer('paths_weight', self.conv_weight().detach().clone())
            for name in ('conv_kernel', 'conv_k', 'conv_kernel2', 'conv_k2', 'weight_index', 'zero'):
                if hasattr(self, name):
                    delattr(self, name)
            self.use_triton = False
        num_paths = len(self.dilations)
        fuse = self.fuse
        out_chs, r = fuse.out_channels, fuse.in_channels
        self.proj = nn.Conv2d(r * num_paths, out_chs * num_paths, 1, device=fuse.weight.device,
                              dtype=fuse.weight.dtype)
        # output channel (p, o) reads input channel (j, p) through fuse.weight[o, j]; the other paths' inputs get 0
        weight = fuse.weight.new_zeros(num_paths, out_chs, r, num_paths)
        for path in range(num_paths):
            weight[path, :, :, path] = fuse.weight.view(out_chs, r)
        self.proj.weight.copy_(weight.view(num_paths * out_chs, r * num_paths, 1, 1))
        self.proj.bias.copy_(fuse.bias.repeat(num_paths))
        # a frozen unit stays frozen: an optimizer built from the trainable parameters must not pick `proj` up
        self.proj.weight.requires_grad_(fuse.weight.requires_grad)
        self.proj.bias.requires_grad_(fuse.bias.requires_grad)
        del self.fuse

    def _static_kernel(self, chs: int, kernel_size: int, dilation: int, dd: dict) -> nn.Conv2d:
        padding = dilation * (kernel_size - 1) // 2
        return nn.Conv2d(chs, chs, kernel_size, self.stride, padding, dilation, groups=chs, **dd)

    def kernel_codes(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Per-dilation kernel codes g = ReLU(conv(GAP(x))), each [N, r]."""
        pooled = x.mean((2, 3), keepdim=True)
        if self.shared_reduction:
            code = F.relu(self.conv(pooled)).flatten(1)
            return [code, code] if self.two_paths else [code]
        codes = [F.relu(self.conv_gen(pooled)).flatten(1)]
        if self.two_paths:
            codes.append(F.relu(self.conv_gen2(pooled)).flatten(1))
        return codes

    def kernel_bases(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-dilation (u, v): the kernel of a channel with code g is g * u + v."""
        if not hasattr(self, 'conv_kernel'):
            raise RuntimeError('this DidaModule was reparameterized: its kernel basis is folded into `paths_weight`')
        tensors = self.generator_tensors()
        return [kernel_basis(*tensors[4 * i:4 * i + 4], k) for i, k in enumerate(self.kernel_sizes)]

    @torch.jit.ignore
    def generate_kernels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The explicit per-sample kernels, one [N, r, k, k] tensor per dilation (inspection and tests)."""
        if not self.dynamic:
            raise RuntimeError('a static DidaModule has no generated kernels')
        return [g[:, :, None, None] * u + v for g, (u, v) in zip(self.kernel_codes(x), self.kernel_bases())]

    def conv_weight(self) -> torch.Tensor:
        """The weight of the one grouped conv that runs every path: [r * 2 * paths, 1, S, S].

        Output channel (j, e, p) of group j holds path p's kernel basis, v_p for e = 0 and u_p for e = 1 (the kernel
        of code g is g * u_p + v_p), embedded in the common S x S window (dilation `conv_dilation`). Built as one
        gather and one multiply-add of the generator parameters, whatever the number of paths; stored once
        `reparameterize` has run.
        """
        if hasattr(self, 'paths_weight'):
            return self.paths_weight
        else:
            factors = torch.take(_generator_vector(self.generator_tensors(), self.zero), self.weight_index)
            scale, factor, term = factors.chunk(3)
            return torch.addcmul(term, scale, factor)

    def dynamic_conv(self, feat: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Per-sample depthwise conv of `feat` [N, r, H, W] on every path, in factored form.

        Args:
            feat: Reduced features F.
            code: Kernel codes g, [N, r, 1, 1] shared by the paths (shared reduction), else [N, r, paths, 1].

        Returns:
            The paths, channel-major: [N, r, paths, H' * W'] (laid out so, or on CPU [N, H' * W', r, paths]).
        """
        out = F.conv2d(_grouped_conv_input(feat), self.conv_weight(), None, self.stride, self.padding,
                       self.conv_dilation, groups=self.reduced_chs)
        # a view in either memory layout (it splits the channels and merges the rows with the columns)
        shift, slope = out.view(
            out.shape[0], self.reduced_chs, 2, len(self.dilations), out.shape[2] * out.shape[3]).unbind(2)
        return torch.addcmul(shift, slope, code)

    def fuse_paths(self, paths: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The shared `fuse` conv on every path, concatenated: [N, r, paths, H' * W' or H', W'] -> [N, P, H', W']."""
        n, r, num_paths = paths.shape[:3]
        if hasattr(self, 'proj'):  # reads the channel-major paths as they are (a view in the blend's layouts)
            return pointwise_conv(paths.reshape(n, r * num_paths, height, width), self.proj.weight, self.proj.bias)
        # path-major rows (a copy of the r-channel input, never of the P-channel output) make the conv's result the
        # concatenation of the paths
        out = pointwise_conv(paths.transpose(1, 2).reshape(n * num_paths, r, height, width), self.fuse.weight,
                             self.fuse.bias)
        return _concatenated_paths(out, n, num_paths)

    def generator_tensors(self) -> List[torch.Tensor]:
        """Per dilation the generator's `conv_kernel.weight`, `conv_kernel.bias`, `conv_k.weight`, `conv_k.bias`."""
        kernel_bias, scale_bias = self.conv_kernel.bias, self.conv_k.bias
        assert kernel_bias is not None and scale_bias is not None  # the generator convs always have biases
        tensors = [self.conv_kernel.weight, kernel_bias, self.conv_k.weight, scale_bias]
        if self.two_paths:
            kernel_bias, scale_bias = self.conv_kernel2.bias, self.conv_k2.bias
            assert kernel_bias is not None and scale_bias is not None
            tensors += [self.conv_kernel2.weight, kernel_bias, self.conv_k2.weight, scale_bias]
        return tensors

    @torch.jit.ignore
    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """The unit with its dynamic paths on the Triton kernels, between the two 1x1 convs.

        The kernels run on GPUs, so the 1x1s are plain (cuDNN) convs here, as `pointwise_conv` runs them off CPU;
        called directly, so that tests on CPU tensors (Triton's interpreter) run the GPU's ops.
        """
        pre = F.conv2d(x, self.conv.weight, self.conv.bias)
        n, r, h, w = pre.shape
        paths = dynamic_paths(pre.flatten(2), self.generator_tensors(), h, w, self.stride, list(self.dilations))
        height, width = output_size(h, w, self.stride)
        # the paths are laid out [N, paths, r, H' * W']: a batch of path-major samples, whose fused outputs are
        # the concatenation
        out = F.conv2d(paths.view(n * len(self.dilations), r, height, width), self.fuse.weight, self.fuse.bias)
        return _concatenated_paths(out, n, len(self.dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.use_triton and triton_runs_on(x):
                return self.forward_triton(x)
        pre = pointwise_conv(x, self.conv.weight, self.conv.bias)
        height, width = output_size(x.shape[2], x.shape[3], self.stride)
        feat = F.relu(pre)
        if self.dynamic:
            if self.shared_reduction:
                # GAP commutes with the 1x1 conv, so g = ReLU(conv(GAP(x))) = ReLU(GAP(conv(x))): one conv fewer
                code = F.relu(pre.mean((2, 3), keepdim=True))
            else:
                code = torch.stack(self.kernel_codes(x), 2).unsqueeze(3)
            paths = self.dynamic_conv(feat, code)
        else:
            outs = [self.conv_kernel(feat), self.conv_kernel2(feat)] if self.two_paths else [self.conv_kernel(feat)]
            # channel-major as `fuse_paths` takes them, stored as its conv reads them (no copy either way)
            paths = torch.stack(outs, 2) if hasattr(self, 'proj') else torch.stack(outs, 1).transpose(1, 2)
        return self.fuse_paths(paths, height, width)
