"""Crash-safe training checkpoints: weights as safetensors, the rest of the state loaded with weights_only.

A checkpoint is a folder `epoch-NNNN/` with `model.safetensors` (and `ema.safetensors`) plus `state.pt`
(optimizer, scheduler, epoch, metric history; a resumed epoch reseeds from the run seed). It is written under a temporary name and renamed
into place, then `last` (a one-line file) is replaced to point at it; a run killed at any moment leaves
either the previous checkpoint or the new one as `last`, never a half-written one.
"""
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import safetensors.torch
import torch
import torch.nn as nn

__all__ = ['save_checkpoint', 'load_last_checkpoint', 'replace_file', 'save_weights']


def _weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` by `write(tmp)` to a temporary file beside it, renamed into place: a run killed meanwhile (or a
    full disk) leaves the old file or the new one, never a part of it."""
    path = Path(path)
    # one name per file: a process killed while writing leaves one stale copy, which the next write replaces
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, path: Path) -> None:
    """`model`'s state dict as a safetensors file, written by `replace_file`."""
    replace_file(path, lambda tmp: safetensors.torch.save_file(_weights(model), str(tmp)))


def save_checkpoint(
        directory: Path,
        epoch: int,
        model: nn.Module,
        state: Dict[str, Any],
        ema: Optional[nn.Module] = None,
        keep: int = 2,
) -> Path:
    """Write checkpoint `epoch` atomically and keep only the newest `keep` of them.

    Args:
        directory: The run's checkpoint folder.
        epoch: Number of finished epochs.
        model: The model (unwrapped from DDP / compile).
        state: Picklable training state made of tensors, numbers, strings, lists, tuples and dicts.
        ema: EMA model, if any.
        keep: Checkpoints to keep.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f'epoch-{epoch:04d}'
    tmp = directory / f'.tmp-{final.name}-{uuid.uuid4().hex[:8]}'
    tmp.mkdir()
    safetensors.torch.save_file(_weights(model), str(tmp / 'model.safetensors'))
    if ema is not None:
        safetensors.torch.save_file(_weights(ema), str(tmp / 'ema.safetensors'))
    torch.save(dict(state, epoch=epoch), tmp / 'state.pt')
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / f'.last-{uuid.uuid4().hex[:8]}'
    pointer.write_text(final.name + '\n')
    os.replace(pointer, directory / 'last')
    for old in sorted(directory.glob('epoch-*'))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob('.tmp-*'):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_last_checkpoint(
        directory: Path,
        model: nn.Module,
        ema: Optional[nn.Module] = None,
) -> Optional[Dict[str, Any]]:
    """Load the checkpoint `last` points to into `model` (and `ema`); returns its state, or None if none.

    Raises:
        OSError: naming the file that is missing or cannot be read (a copy cut short, a disk error), and the older
            checkpoint that `last` could name instead.
    """
    pointer = Path(directory) / 'last'
    if not pointer.exists():
        return None
    folder = Path(directory) / pointer.read_text().strip()
    files = [(model, folder / 'model.safetensors')] + ([(ema, folder / 'ema.safetensors')] if ema is not None else [])
    try:
        for module, path in files:  # an EMA left at the model's first weights would be silently wrong
            module.load_state_dict(safetensors.torch.load_file(str(path)))
        path = folder / 'state.pt'
        return torch.load(path, map_location='cpu', weights_only=True)
    # a damaged state.pt fails torch's reader (RuntimeError) or, damaged in its first bytes, its unpickler (also the
    # refusal of a pickle that weights_only will not run: still refused, with the file named)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        older = [f.name for f in sorted(Path(directory).glob('epoch-*')) if f.name < folder.name]
        hint = f'; to resume from the one before, write {older[-1]} into {pointer}' if older else ''
        raise OSError(f'cannot resume from {path} ({type(e).__name__}: {e}){hint}') from e
