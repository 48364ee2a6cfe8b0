"""Datasets of one domain whose labels index a class map shared by every domain of a run.

Domain adaptation mixes several domains in one run, so a label must mean the same class in each of them:
labels are always looked up by class NAME in the run's class map, never taken from folder order.
"""
import copy
import struct
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ['DomainDataset', 'ArrayDomainDataset', 'FileDomainDataset', 'UNLABELLED', 'READ_ERRORS', 'read_error_reason']

UNLABELLED = -1


class DomainDataset(Dataset):
    """Images of one domain with labels into `classes` (UNLABELLED where unknown).

    Args:
        domain: Domain name.
        classes: The run's class map (index = label).
        labels: Label of every image.
        transform: Applied to each PIL image.
    """

    def __init__(self, domain: str, classes: Sequence[str], labels: Sequence[int], transform: Optional[Callable]):
        self.domain = domain
        self.classes = list(classes)
        self.targets = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> 'DomainDataset':
        """The same domain restricted to `indices` (a held-out slice, or the rest of it)."""
        indices = np.asarray(indices, dtype=np.int64)
        sub = copy.copy(self)
        sub.targets = self.targets[indices]
        sub._take(indices)
        return sub

    def _take(self, indices: np.ndarray) -> None:
        raise NotImplementedError

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(domain={self.domain!r}, images={len(self)}, classes={len(self.classes)})'


class ArrayDomainDataset(DomainDataset):
    """A domain held in memory as a uint8 array [N, H, W, 3]."""

    def __init__(
            self,
            domain: str,
            classes: Sequence[str],
            images: np.ndarray,
            labels: Sequence[int],
            transform: Optional[Callable] = None,
    ):
        if len(images) != len(labels):
            raise ValueError(f'domain {domain!r}: {len(images)} images but {len(labels)} labels')
        super().__init__(domain, classes, labels, transform)
        self.images = images

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def _take(self, indices: np.ndarray) -> None:
        self.images = self.images[indices]


_EXIF_ORIENTATION = 0x0112


class FileDomainDataset(DomainDataset):
    """A domain of image files; a file that cannot be decoded raises an error naming it.

    `skipped_paths` lists the files without an image extension that the reader left out, `skipped` counts them.
    """

    def __init__(
            self,
            domain: str,
            classes: Sequence[str],
            samples: List[Tuple[Path, int]],
            transform: Optional[Callable] = None,
            skipped: Sequence[Path] = (),
    ):
        super().__init__(domain, classes, [label for _, label in samples], transform)
        self.paths = [Path(path) for path, _ in samples]
        self.skipped_paths = [Path(p) for p in skipped]

    @property
    def skipped(self) -> int:
        return len(self.skipped_paths)

    def _take(self, indices: np.ndarray) -> None:
        self.paths = [self.paths[i] for i in indices]

    def without_unreadable(self) -> Tuple['FileDomainDataset', List[Tuple[Path, str]]]:
        """This domain without the files that cannot be decoded, and those files with the reason."""
        unreadable = []
        for path in self.paths:
            try:
                with Image.open(path) as img:
                    img.load()
            except READ_ERRORS as e:
                unreadable.append((path, read_error_reason(e)))
        if not unreadable:
            return self, []
        bad = {p for p, _ in unreadable}
        return self.subset([i for i, p in enumerate(self.paths) if p not in bad]), unreadable

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                # upright as a viewer shows it: a phone photo stores its rotation as an EXIF tag (transposing copies
                # the image, so only where the tag says to)
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    img = ImageOps.exif_transpose(img)
                return to_rgb(img)
        except READ_ERRORS as e:
            raise OSError(f'cannot read image {path} (domain {self.domain!r}): {e}') from e


# what PIL raises for a file it cannot decode (truncated, not an image, a decompression bomb; a damaged PNG chunk
# raises SyntaxError, short or corrupt data structures EOFError, struct.error or zlib.error)
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def read_error_reason(error: BaseException) -> str:
    """'ErrorType: message' of the decoding error behind `error` (a `load` error names its cause)."""
    cause = error.__cause__ or error
    return f'{type(cause).__name__}: {cause}'


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit gray is rescaled (not clipped), alpha is composited on black, and so is a
    colour key (a PNG's `transparency` in L, RGB or P mode, as an optimiser may store it; a 16-bit one's key is not
    applied)."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith('I;16') else max(float(arr.max()), 1.0)
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA') or 'transparency' in img.info:
        img = img.convert('RGBA')
        background = Image.new('RGBA', img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert('RGB')
