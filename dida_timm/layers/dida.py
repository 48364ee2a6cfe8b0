"""The DIDA module: a dynamic instance adaptation unit.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028
(Deng, Zhou, Li, He, Song, Xiang; IEEE T-IP 2022).

The module reduces the input X [N, C, H, W] to r = C // m channels with a 1x1 conv, generates one k x k
kernel per (sample, channel) from the globally pooled input through the SAME 1x1 conv, convolves each
reduced channel depthwise with its own kernel, and fuses the result back to P channels with a shared 1x1
conv, once per dilation; the dilation outputs are concatenated.

    F = ReLU(conv(X)),  g = ReLU(conv(GAP(X))),  K[n, j] = a * (g[n, j] * u0 + v0) + c = g[n, j] * u + v

Because K is affine in g, the dynamic depthwise conv factors into two static convs and a scale:

    O[n, j] = g[n, j] * (u * F[n, j]) + (v * F[n, j])

so the default forward has no loop over the batch and no batch-size-dependent groups: both static convs run
as one grouped conv with two output channels per reduced channel, then a per-(sample, channel) scale and add.
That formulation was chosen by timing the branch's training step (batch 64, dida_resnet18 shapes, 2 CPU
cores, torch 2.14.1): the grouped conv beat a single-plane conv over the [N * r, 1, H, W] view (which took
25 ms instead of 3 ms on 7x7 maps) and a 9-tap shift-and-add; it is also cuDNN's fast depthwise path on GPU.

Parameter names (`conv`, `conv_kernel`, `conv_kernel2`, `conv_k`, `conv_k2`, `fuse`) follow the authors'
released code so that checkpoints stay convertible. Differences from that code: the generator is never
detached (gradients reach `conv_kernel*`, `conv_k*` and `conv`), and the ablations of the paper (static
kernels, unshared reduction convs, one dilation, a 1x1 kernel on the dilation-1 path) are options.
"""
from typing import Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DidaModule', 'kernel_basis']


def _per_dilation(value: Union[int, Sequence[int]], num: int, name: str) -> Tuple[int, ...]:
    values = (value,) * num if isinstance(value, int) else tuple(value)
    if len(values) != num:
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


class DidaModule(nn.Module):
    """Dynamic instance adaptation module (paper Fig. 3, SPEC section 1).

    Args:
        in_chs: Input channels C.
        out_chs: Output channels P, split evenly across the dilation paths.
        stride: Stride of the dynamic depthwise conv.
        reduction: Channel reduction m, r = in_chs // m.
        dilations: One dynamic path per dilation, one or two of them.
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
            dilations: Sequence[int] = (1, 2),
            kernel_size: Union[int, Sequence[int]] = 3,
            shared_reduction: bool = True,
            dynamic: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        dilations = tuple(dilations)
        if len(dilations) not in (1, 2):
            raise ValueError(f'DidaModule supports one or two dilations, got {dilations!r}')
        kernel_sizes = _per_dilation(kernel_size, len(dilations), 'kernel_size')
        if any(k % 2 == 0 or k < 1 for k in kernel_sizes):
            raise ValueError(f'kernel_size must be odd and positive, got {kernel_size!r}')
        if out_chs % len(dilations):
            raise ValueError(f'out_chs ({out_chs}) must divide by the number of dilations ({len(dilations)})')
        if in_chs // reduction < 1:
            raise ValueError(f'reduction {reduction} leaves no channels of in_chs={in_chs}')
        r = in_chs // reduction
        self.reduced_chs = r
        self.stride = stride
        self.dilations = dilations
        self.kernel_sizes = kernel_sizes
        self.paddings = tuple(d * (k - 1) // 2 for d, k in zip(dilations, kernel_sizes))
        self.dynamic = dynamic
        self.two_paths = len(dilations) == 2
        self.shared_reduction = shared_reduction or not dynamic

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
        self.fuse = nn.Conv2d(r, out_chs // len(dilations), 1, **dd)

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
        bases = [kernel_basis(
            self.conv_kernel.weight, self.conv_kernel.bias, self.conv_k.weight, self.conv_k.bias,
            self.kernel_sizes[0])]
        if self.two_paths:
            bases.append(kernel_basis(
                self.conv_kernel2.weight, self.conv_kernel2.bias, self.conv_k2.weight, self.conv_k2.bias,
                self.kernel_sizes[1]))
        return bases

    @torch.jit.ignore
    def generate_kernels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The explicit per-sample kernels, one [N, r, k, k] tensor per dilation (inspection and tests)."""
        if not self.dynamic:
            raise RuntimeError('a static DidaModule has no generated kernels')
        return [g[:, :, None, None] * u + v for g, (u, v) in zip(self.kernel_codes(x), self.kernel_bases())]

    def dynamic_conv(
            self,
            feat: torch.Tensor,
            code: torch.Tensor,
            basis: Tuple[torch.Tensor, torch.Tensor],
            dilation: int,
            padding: int,
    ) -> torch.Tensor:
        """Per-sample depthwise conv of `feat` [N, r, H, W] with kernels g * u + v, in factored form."""
        u, v = basis
        r = self.reduced_chs
        # output channels (2j, 2j + 1) = channel j convolved with u and with v: one grouped conv for both
        weight = torch.stack([u, v]).unsqueeze(0).expand(r, -1, -1, -1).reshape(2 * r, 1, u.shape[0], u.shape[1])
        out = F.conv2d(feat, weight, None, self.stride, padding, dilation, groups=r).unflatten(1, (r, 2))
        return out[:, :, 0] * code[:, :, None, None] + out[:, :, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.relu(self.conv(x))
        if self.dynamic:
            codes = self.kernel_codes(x)
            bases = self.kernel_bases()
            out = self.fuse(self.dynamic_conv(feat, codes[0], bases[0], self.dilations[0], self.paddings[0]))
            if self.two_paths:
                out2 = self.fuse(self.dynamic_conv(feat, codes[1], bases[1], self.dilations[1], self.paddings[1]))
                out = torch.cat([out, out2], 1)
        else:
            out = self.fuse(self.conv_kernel(feat))
            if self.two_paths:
                out = torch.cat([out, self.fuse(self.conv_kernel2(feat))], 1)
        return out
