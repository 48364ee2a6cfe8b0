"""Literal per-sample reference of the DIDA module (tests and benchmarks only).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

It runs the equations as they read, from the module's own submodules and nothing else of its implementation:
g = ReLU(conv(GAP(X))), every kernel K[n, j] = conv_k(conv_kernel(g[n, j])) through the generator convs, and one
grouped conv per sample and dilation. The model never uses it: `DidaModule.forward` computes the same result in
factored form.
"""
from typing import List

import torch
import torch.nn.functional as F

from .dida import DidaModule

__all__ = ['dida_forward_per_sample', 'literal_kernels']


def literal_kernels(module: DidaModule, x: torch.Tensor) -> List[torch.Tensor]:
    """Per-sample kernels, one [N, r, k, k] tensor per dilation (a static module's learned kernels, repeated).

    Args:
        module: A DidaModule.
        x: Input [N, C, H, W].
    """
    n, r = x.shape[0], module.reduced_chs
    if not module.dynamic:
        convs = [module.conv_kernel, module.conv_kernel2] if module.two_paths else [module.conv_kernel]
        return [c.weight.squeeze(1).expand(n, -1, -1, -1) for c in convs]
    pooled = x.mean((2, 3), keepdim=True)
    generators = [(module.conv_kernel, module.conv_k)]
    reductions = [module.conv if module.shared_reduction else module.conv_gen]
    if module.two_paths:
        generators.append((module.conv_kernel2, module.conv_k2))
        reductions.append(module.conv if module.shared_reduction else module.conv_gen2)
    kernels = []
    for (conv_kernel, conv_k), reduction, k in zip(generators, reductions, module.kernel_sizes):
        g = F.relu(reduction(pooled))  # [N, r, 1, 1]
        taps = conv_kernel(g.reshape(n * r, 1, 1, 1))  # each code through the 1 -> k*k conv: [N * r, k*k, 1, 1]
        kernels.append(conv_k(taps.reshape(n * r * k * k, 1, 1, 1)).reshape(n, r, k, k))  # then the scalar conv
    return kernels


def dida_forward_per_sample(module: DidaModule, x: torch.Tensor) -> torch.Tensor:
    """Run `module` on `x` with an explicit loop over the batch and per-sample depthwise kernels.

    Args:
        module: A DidaModule.
        x: Input [N, C, H, W].

    Returns:
        The module output [N, P, H', W'].
    """
    feat = F.relu(module.conv(x))
    paths = []
    for kernels, dilation, k in zip(literal_kernels(module, x), module.dilations, module.kernel_sizes):
        bias = None if module.dynamic else (module.conv_kernel if len(paths) == 0 else module.conv_kernel2).bias
        per_sample = [
            F.conv2d(feat[n:n + 1], kernels[n].unsqueeze(1), bias, module.stride, dilation * (k - 1) // 2,
                     dilation, groups=module.reduced_chs)
            for n in range(x.shape[0])
        ]
        paths.append(module.fuse(torch.cat(per_sample)))
    return torch.cat(paths, 1)
