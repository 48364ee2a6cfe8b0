"""Process group setup for torchrun, with a collective timeout.

timm's `init_distributed_device` sets no timeout, so a rank that hangs (rather than dies: torchrun already
stops the job then) would block the others for torch's default 30 minutes; here the timeout is a setting.
"""
import os
from datetime import timedelta
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ['init_distributed']


def init_distributed(device: str, timeout_s: float = 600.0) -> Tuple[torch.device, int, int]:
    """Join the torchrun process group if there is one; returns (device, rank, world size).

    Args:
        device: 'cpu' or 'cuda' (each rank takes cuda:LOCAL_RANK); the backend follows (gloo / nccl).
        timeout_s: Seconds a collective may wait for the other ranks before the run fails.
    """
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return torch.device(device), 0, 1
    if device.startswith('cuda'):
        device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=timedelta(seconds=timeout_s))
    return torch.device(device), dist.get_rank(), dist.get_world_size()
