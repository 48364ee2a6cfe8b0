"""Weak, strong and test views for FixMatch-style domain adaptation (SPEC section 3), on timm's transforms.

weak   = resize to the input size (+ horizontal flip + random translation for natural images; none for digits)
strong = the weak view + RandAugment (timm, 2 ops, FixMatch-like magnitude) + Cutout (a square of zeros
         in the normalised image, i.e. the mean colour)
test   = resize to the input size, no centre crop (timm's `create_transform`, crop_pct 1, squash)
"""
from typing import Callable, Dict, Sequence, Tuple

from timm.data import create_transform, rand_augment_transform
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = ['create_uda_transforms', 'test_data_config', 'TransformedDataset', 'TwoViewDataset']


def test_data_config(input_size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = 'bilinear') -> Dict[str, object]:
    """timm data config of the test view (resize to the input size, no centre crop): what a run evaluates with
    and what its export records for prediction."""
    return dict(input_size=(3, input_size, input_size), interpolation=interpolation, mean=tuple(mean),
                std=tuple(std), crop_pct=1.0, crop_mode='squash')


def create_uda_transforms(
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        translate: float = 0.125,
        rand_augment: str = 'rand-m10-n2-mstd0.5',
        cutout: int = 16,
        interpolation: str = 'bilinear',
) -> Dict[str, Callable]:
    """Build the 'weak', 'strong' and 'test' transforms.

    Args:
        input_size: Square input size.
        mean: Normalisation mean.
        std: Normalisation std.
        flip: Random horizontal flip in the weak and strong views (off for digits).
        translate: Random translation, as a fraction of the size, in the weak and strong views (0 = off).
        rand_augment: timm RandAugment config string for the strong view ('' = off).
        cutout: Side in pixels of the Cutout square in the strong view (0 = off).
        interpolation: Resize interpolation.
    """
    test = create_transform(**test_data_config(input_size, mean, std, interpolation), is_training=False)
    resize = T.Resize((input_size, input_size), interpolation=T.InterpolationMode(interpolation))
    geometric = [resize]
    if flip:
        geometric.append(T.RandomHorizontalFlip())
    if translate:
        geometric.append(T.RandomAffine(0, translate=(translate, translate)))
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    strong = list(geometric)
    if rand_augment:
        fill: Tuple[int, ...] = tuple(round(255 * m) for m in mean)
        strong.append(rand_augment_transform(rand_augment, dict(translate_const=int(input_size * 0.45), img_mean=fill)))
    strong += to_tensor
    if cutout:
        area = min(1.0, cutout ** 2 / input_size ** 2)
        strong.append(T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    return dict(weak=T.Compose(geometric + to_tensor), strong=T.Compose(strong), test=test)


class TransformedDataset(Dataset):
    """Wrap a dataset of (PIL image, label) to return (transform(image), label)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return self.transform(img), label


class TwoViewDataset(TransformedDataset):
    """Wrap a dataset of (PIL image, label) to return (weak view, strong view, label)."""

    def __init__(self, dataset: Dataset, weak: Callable, strong: Callable):
        super().__init__(dataset, weak)
        self.strong = strong

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return self.transform(img), self.strong(img), label
