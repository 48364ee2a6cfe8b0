"""Literal per-sample reference of the DIDA module's dynamic convolution (tests and benchmarks only).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

It materialises every sample's kernels and runs one grouped conv per sample, exactly as the equations read.
The model never uses it: `DidaModule.forward` computes the same result in factored form.
"""
import torch
import torch.nn.functional as F

from .dida import DidaModule

__all__ = ['dida_forward_per_sample']


def dida_forward_per_sample(module: DidaModule, x: torch.Tensor) -> torch.Tensor:
    """Run `module` on `x` with an explicit loop over the batch and per-sample depthwise kernels.

    Args:
        module: A dynamic DidaModule.
        x: Input [N, C, H, W].

    Returns:
        The module output [N, P, H', W'].
    """
    feat = F.relu(module.conv(x))
    paths = []
    for kernels, dilation, padding in zip(module.generate_kernels(x), module.dilations, module.paddings):
        per_sample = [
            F.conv2d(feat[n:n + 1], kernels[n].unsqueeze(1), None, module.stride, padding, dilation,
                     groups=module.reduced_chs)
            for n in range(x.shape[0])
        ]
        paths.append(module.fuse(torch.cat(per_sample)))
    return torch.cat(paths, 1)
