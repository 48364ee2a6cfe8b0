import importlib.util
import os

import pytest
import torch

# without a GPU the Triton DIDA kernels are tested through Triton's interpreter (set before they are defined)
if importlib.util.find_spec('triton') is not None and not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
if torch.cuda.is_available():
    # the tests compare fp32 results to 1e-5; cuDNN's convs would otherwise run in TF32 (10-bit mantissas) on the
    # GPUs that have it (matmuls already default to fp32)
    torch.backends.cudnn.allow_tf32 = False

import dida_timm  # noqa: F401  registers the models with timm
import timm

from hf_cache import build_backbone_cache


@pytest.fixture(scope='session')
def hf_cache(tmp_path_factory):
    """A local Hugging Face cache holding the ImageNet checkpoints of every dida_resnet18 tag."""
    cache = tmp_path_factory.mktemp('hf_cache')
    build_backbone_cache(cache, timm.list_pretrained('dida_resnet18.*'))
    return cache


@pytest.fixture
def offline_hub(hf_cache, monkeypatch):
    """Route timm's hub downloads to the local cache, with the network forbidden."""
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(hf_cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(hf_cache))
    return hf_cache
