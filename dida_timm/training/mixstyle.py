"""MixStyle: mixes per-instance feature statistics between images of a batch (training only).

`Domain Generalization with MixStyle` (Zhou et al., ICLR 2021) - https://arxiv.org/abs/2104.02008.
DIDA-Net uses it in its single-source settings (after layer1 of ResNet-50, after conv1 of the digit CNN).
"""
import torch
import torch.nn as nn

__all__ = ['MixStyle', 'attach_mixstyle', 'mixstyle_target']


class MixStyle(nn.Module):
    """Replace each image's channel mean/std by a Beta-weighted mix with another image's (random permutation).

    Args:
        p: Probability of mixing a batch.
        alpha: Beta(alpha, alpha) concentration.
        eps: Added to the variance.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.beta = torch.distributions.Beta(alpha, alpha)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or torch.rand(()) > self.p:
            return x
        n = x.shape[0]
        mu = x.mean((2, 3), keepdim=True)
        sig = (x.var((2, 3), keepdim=True) + self.eps).sqrt()
        mu, sig = mu.detach(), sig.detach()
        normed = (x - mu) / sig
        lam = self.beta.sample((n, 1, 1, 1)).to(x)
        perm = torch.randperm(n, device=x.device)
        return normed * (sig * lam + sig[perm] * (1 - lam)) + mu * lam + mu[perm] * (1 - lam)


class _MixStyleHook:
    """Forward hook applying a MixStyle module; an object (not a closure) so that deep copies of the model
    (e.g. an EMA copy) call their own copy of the MixStyle module, which follows their own train/eval mode."""

    def __init__(self, mixstyle: MixStyle):
        self.mixstyle = mixstyle

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self.mixstyle(output)


def mixstyle_target(model: nn.Module, module_name: str) -> nn.Module:
    """`model.<module_name>`, the module whose output MixStyle mixes; a ValueError naming the choices if none."""
    try:
        return model.get_submodule(module_name)
    except AttributeError as e:
        raise ValueError(f'{type(model).__name__} has no such module: {module_name!r} (its top-level modules: '
                         f'{", ".join(name for name, _ in model.named_children())})') from e


def attach_mixstyle(model: nn.Module, module_name: str, mixstyle: MixStyle) -> None:
    """Apply `mixstyle` to the output of `model.<module_name>` through a forward hook.

    The MixStyle module is registered on the model (as `mixstyle`) so that `model.train()` / `model.eval()`
    switch it; it has no parameters, so checkpoints are unchanged.
    """
    target = mixstyle_target(model, module_name)
    model.add_module('mixstyle', mixstyle)
    target.register_forward_hook(_MixStyleHook(mixstyle))
