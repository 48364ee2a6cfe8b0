"""Process group setup for torchrun, with a collective timeout.

timm's `init_distributed_device` sets no timeout, so a rank that hangs (rather than dies: torchrun already
stops the job then) would block the others for torch's default 30 minutes; here the timeout is a setting.
"""
import os
from datetime import timedelta
from typing import Tuple, TypeVar

import torch
import torch.distributed as dist

__all__ = ['broadcast_from_main', 'init_distributed']

T = TypeVar('T')


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


def broadcast_from_main(value: T) -> T:
    """`value` as rank 0 holds it, on every rank: for what each rank would work out apart and must agree on (a name
    built from the clock). Outside a process group, `value` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
