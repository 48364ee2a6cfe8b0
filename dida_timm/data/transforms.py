"""Weak, strong and test views for FixMatch-style domain adaptation (docs/METHOD.md section 3), on timm's transforms.

weak   = resize to the input size (+ horizontal flip + random translation for natural images; none for digits)
strong = the weak view + RandAugment + Cutout, one of two recipes:
         - a timm RandAugment string (the default, `rand-m10-n2-mstd0.5`): timm's op list (Invert and SolarizeAdd
           included, each op applied with p=0.5, magnitude near 10), then Cutout as a square of zeros in the
           normalised image (the mean colour) lying wholly inside the image;
         - `fixmatch`: FixMatch's RandAugment (FixMatch paper Table 12, the released code's RandAugmentFixMatch):
           2 ops drawn with replacement from 14, each ALWAYS applied with a magnitude uniform in its range,
           then a Cutout whose centre is uniform over the image, clipped at the border, filled black before
           normalisation.
test   = resize to the input size, no centre crop (timm's `create_transform`, crop_pct 1, squash)
"""
import random
from typing import Callable, Dict, Optional, Sequence, Tuple

from PIL import Image, ImageDraw
from timm.data import auto_augment as aa
from timm.data import create_transform, rand_augment_transform
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = ['create_uda_transforms', 'test_data_config', 'Cutout', 'FIXMATCH_OPS', 'FIXMATCH_RAND_AUGMENT',
           'FixMatchRandAugment', 'TransformedDataset', 'TwoViewDataset']

# the value of `rand_augment` that selects FixMatch's strong view instead of a timm RandAugment string
FIXMATCH_RAND_AUGMENT = 'fixmatch'


def _identity(img: Image.Image, **_) -> Image.Image:
    return img


def _posterize(img: Image.Image, bits: float, **_) -> Image.Image:
    return aa.posterize(img, int(bits))


# FixMatch's RandAugment: (name, timm's PIL op, magnitude range or None for ops without one). The enhance ops
# only reduce (factor < 1); translations are fractions of the image size.
FIXMATCH_OPS: Tuple[Tuple[str, Callable, Optional[Tuple[float, float]]], ...] = (
    ('AutoContrast', aa.auto_contrast, None),
    ('Brightness', aa.brightness, (0.05, 0.95)),
    ('Color', aa.color, (0.05, 0.95)),
    ('Contrast', aa.contrast, (0.05, 0.95)),
    ('Equalize', aa.equalize, None),
    ('Identity', _identity, None),
    ('Posterize', _posterize, (4, 8)),
    ('Rotate', aa.rotate, (-30, 30)),
    ('Sharpness', aa.sharpness, (0.05, 0.95)),
    ('ShearX', aa.shear_x, (-0.3, 0.3)),
    ('ShearY', aa.shear_y, (-0.3, 0.3)),
    ('Solarize', aa.solarize, (0, 256)),
    ('TranslateX', aa.translate_x_rel, (-0.3, 0.3)),
    ('TranslateY', aa.translate_y_rel, (-0.3, 0.3)),
)


class FixMatchRandAugment:
    """`num_ops` ops drawn with replacement from FIXMATCH_OPS, each always applied, magnitude uniform in its range.

    Args:
        num_ops: Ops per image (2 in FixMatch).
        ops: The op list.
    """

    def __init__(self, num_ops: int = 2, ops=FIXMATCH_OPS):
        self.num_ops = num_ops
        self.ops = ops

    def __call__(self, img: Image.Image) -> Image.Image:
        for _, op, span in random.choices(self.ops, k=self.num_ops):
            img = op(img) if span is None else op(img, random.uniform(*span))
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_ops={self.num_ops}, ops={[name for name, _, _ in self.ops]})'


class Cutout:
    """FixMatch's Cutout on a PIL image: a `size` x `size` square, centre uniform over the image, clipped at the
    border, filled with `fill` (black)."""

    def __init__(self, size: int, fill: Tuple[int, ...] = (0, 0, 0)):
        self.size = size
        self.fill = fill

    def box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of one random hole, end exclusive, as the released code's CutoutAbs computes it."""
        cx, cy = random.uniform(0, width), random.uniform(0, height)
        x0, y0 = int(max(0.0, cx - self.size / 2)), int(max(0.0, cy - self.size / 2))
        return x0, y0, min(width, x0 + self.size), min(height, y0 + self.size)

    def __call__(self, img: Image.Image) -> Image.Image:
        x0, y0, x1, y1 = self.box(*img.size)
        img = img.copy()
        if x1 > x0 and y1 > y0:
            fill = self.fill[0] if img.mode in ('L', '1', 'I', 'F') else self.fill
            ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, fill={self.fill})'

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
        translate: Random translation, as a fraction of the size, in the weak view (0 = off); the strong view's
            RandAugment draws its own translations.
        rand_augment: The strong view's RandAugment: 'fixmatch' (FixMatch's op list, with FixMatch's Cutout), a
            timm RandAugment config string (with a Cutout inside the image, in the normalised image), or '' (off).
        cutout: Side in pixels of the Cutout square in the strong view (0 = off).
        interpolation: Resize interpolation.
    """
    test = create_transform(**test_data_config(input_size, mean, std, interpolation), is_training=False)
    resize = T.Resize((input_size, input_size), interpolation=T.InterpolationMode(interpolation))
    # the strong view is the weak view's resize and flip, then RandAugment (the released code's): not its translation
    strong = [resize] + ([T.RandomHorizontalFlip()] if flip else [])
    weak = strong + ([T.RandomAffine(0, translate=(translate, translate))] if translate else [])
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    if rand_augment == FIXMATCH_RAND_AUGMENT:
        strong += [FixMatchRandAugment()] + ([Cutout(cutout)] if cutout else []) + to_tensor
        return dict(weak=T.Compose(weak + to_tensor), strong=T.Compose(strong), test=test)
    if rand_augment:
        fill: Tuple[int, ...] = tuple(round(255 * m) for m in mean)
        strong.append(rand_augment_transform(rand_augment, dict(img_mean=fill)))
    strong += to_tensor
    if cutout:
        area = min(1.0, cutout ** 2 / input_size ** 2)
        strong.append(T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    return dict(weak=T.Compose(weak + to_tensor), strong=T.Compose(strong), test=test)


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
