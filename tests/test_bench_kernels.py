"""The kernel diagnostics of bench/bench_dida_kernels.py measure what their names say."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from bench_dida_kernels import domain_share, kernel_spread  # noqa: E402

from dida_timm.layers import DidaModule  # noqa: E402


def test_kernel_spread_is_zero_for_constant_codes_and_matches_explicit_kernels():
    module = DidaModule(32, 16, reduction=8)
    bases = module.kernel_bases()
    assert kernel_spread(torch.full((10, 2, 4), 0.7), bases) == pytest.approx(0, abs=1e-7)
    x = torch.randn(50, 32, 6, 6)
    codes = torch.stack(module.kernel_codes(x), 1)
    explicit = []
    for kernels in module.generate_kernels(x):  # [N, r, k, k]
        deviation = (kernels - kernels.mean(0)).flatten(2).norm(dim=2)  # [N, r]
        explicit.append(deviation.square().mean(0).sqrt() / kernels.mean(0).flatten(1).norm(dim=1))
    assert kernel_spread(codes, bases) == pytest.approx(torch.cat(explicit).mean().item(), rel=1e-5)


def test_domain_share_separates_domain_codes_from_instance_codes():
    by_domain = {'a': torch.zeros(20, 1, 3), 'b': torch.ones(20, 1, 3)}
    assert domain_share(by_domain) == pytest.approx(1.0)
    noise = torch.randn(20, 1, 3)
    assert domain_share({'a': noise, 'b': noise.clone()}) == pytest.approx(0.0, abs=1e-6)


def test_missing_run_folder_is_named(tmp_path, monkeypatch, capsys):
    import bench_dida_kernels
    missing = tmp_path / 'mnistm_style-DIDA-Net-s9'
    monkeypatch.setattr(sys, 'argv', ['bench_dida_kernels.py', str(missing)])
    with pytest.raises(SystemExit, match=r'no finished run .*mnistm_style-DIDA-Net-s9'):
        bench_dida_kernels.main()
