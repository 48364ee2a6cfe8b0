"""The weak / strong / test views, in particular FixMatch's RandAugment and Cutout (`--rand-augment fixmatch`)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from dida_timm.data.transforms import FIXMATCH_OPS, Cutout, FixMatchRandAugment, create_uda_transforms


def test_fixmatch_op_list_is_fixmatchs_fourteen_ops_with_their_ranges():
    spans = {name: span for name, _, span in FIXMATCH_OPS}
    assert spans == {
        'AutoContrast': None, 'Equalize': None, 'Identity': None,
        'Brightness': (0.05, 0.95), 'Color': (0.05, 0.95), 'Contrast': (0.05, 0.95), 'Sharpness': (0.05, 0.95),
        'Posterize': (4, 8), 'Rotate': (-30, 30), 'ShearX': (-0.3, 0.3), 'ShearY': (-0.3, 0.3),
        'Solarize': (0, 256), 'TranslateX': (-0.3, 0.3), 'TranslateY': (-0.3, 0.3)}
    # what each op does, written with PIL itself (FixMatch's definitions; geometric ops resample bicubically)
    def affine(i, *coeffs):
        return i.transform(i.size, Image.AFFINE, coeffs, resample=Image.BICUBIC)

    pil = {
        'AutoContrast': ImageOps.autocontrast, 'Equalize': ImageOps.equalize, 'Identity': lambda i: i,
        'Brightness': lambda i, v: ImageEnhance.Brightness(i).enhance(v),
        'Color': lambda i, v: ImageEnhance.Color(i).enhance(v),
        'Contrast': lambda i, v: ImageEnhance.Contrast(i).enhance(v),
        'Sharpness': lambda i, v: ImageEnhance.Sharpness(i).enhance(v),
        'Posterize': lambda i, v: ImageOps.posterize(i, int(v)),
        'Rotate': lambda i, v: i.rotate(v, resample=Image.BICUBIC),
        'ShearX': lambda i, v: affine(i, 1, v, 0, 0, 1, 0), 'ShearY': lambda i, v: affine(i, 1, 0, 0, v, 1, 0),
        'Solarize': ImageOps.solarize,
        'TranslateX': lambda i, v: affine(i, 1, 0, v * i.size[0], 0, 1, 0),
        'TranslateY': lambda i, v: affine(i, 1, 0, 0, 0, 1, v * i.size[1]),
    }
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for name, op, span in FIXMATCH_OPS:  # at both ends of its range and inside it
        for value in ([None] if span is None else [span[0], span[0] + 0.75 * (span[1] - span[0]), span[1]]):
            out = op(img) if value is None else op(img, value)
            expected = pil[name](img) if value is None else pil[name](img, value)
            assert out.size == img.size and out.mode == 'RGB', name
            assert np.array_equal(np.asarray(out), np.asarray(expected)), (name, value)


def test_two_ops_drawn_with_replacement_always_applied_with_a_uniform_magnitude():
    random.seed(0)
    calls = []

    def recorder(name):
        return lambda img, value=None: calls.append((name, value)) or img

    ops = [(name, recorder(name), span) for name, _, span in FIXMATCH_OPS]
    augment = FixMatchRandAugment(2, ops)
    img = Image.new('RGB', (8, 8))
    for _ in range(3000):
        augment(img)
    assert len(calls) == 6000  # never skipped (timm's RandAugment applies each op with p=0.5)
    assert {name for name, _ in calls} == {name for name, _, _ in FIXMATCH_OPS}
    spans = dict((name, span) for name, _, span in FIXMATCH_OPS)
    for name, span in spans.items():
        values = [v for n, v in calls if n == name]
        if span is None:
            assert values and all(v is None for v in values)
            continue
        low, high = span
        width = high - low
        assert all(low <= v <= high for v in values), name
        # uniform over the whole range, not pinned near one magnitude
        assert min(values) < low + 0.1 * width and max(values) > high - 0.1 * width, name
    pairs = [calls[i][0] == calls[i + 1][0] for i in range(0, len(calls), 2)]
    assert any(pairs)  # drawn with replacement: the same op twice happens


def test_cutout_centre_is_uniform_over_the_image_and_the_hole_is_clipped_at_the_border():
    random.seed(0)
    boxes = [Cutout(16).box(32, 32) for _ in range(4000)]
    assert all(0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 for x0, y0, x1, y1 in boxes)
    covers_centre = sum(x0 <= 16 < x1 and y0 <= 16 < y1 for x0, y0, x1, y1 in boxes) / len(boxes)
    assert 0.15 < covers_centre < 0.4  # ~1/4; a hole kept inside the image covers the centre almost always
    assert sum(x0 == 0 and y0 == 0 for x0, y0, _, _ in boxes) > 100  # top-left corner
    assert sum(x1 == 32 and y1 == 32 for _, _, x1, y1 in boxes) > 100  # bottom-right corner
    assert min(x1 - x0 for x0, _, x1, _ in boxes) <= 9  # clipped at the right border


def test_fixmatch_strong_view_fills_the_hole_black_before_normalisation():
    random.seed(0)
    torch.manual_seed(0)
    views = create_uda_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), flip=False, translate=0,
                                  rand_augment='fixmatch', cutout=16)
    assert 'FixMatchRandAugment' in repr(views['strong']) and 'Cutout(size=16' in repr(views['strong'])
    # the identity op alone: what is left is the Cutout
    views['strong'].transforms[1].ops = [op for op in FIXMATCH_OPS if op[0] == 'Identity']
    white = Image.new('RGB', (32, 32), (255, 255, 255))
    outs = torch.stack([views['strong'](white) for _ in range(400)])
    black = (outs == -1).all(1)  # black is -1 after normalising with mean 0.5, std 0.5
    assert black.any((1, 2)).all() and ((outs == 1) | (outs == -1)).all()
    assert 0.1 < black[:, 16, 16].float().mean() < 0.45 and black[:, 0, 0].any() and black[:, 31, 31].any()


@pytest.mark.parametrize('recipe', ['rand-m10-n2-mstd0.5', 'fixmatch'])
def test_strong_view_keeps_the_tensor_shape_for_both_recipes(recipe):
    views = create_uda_transforms(32, (0.5,) * 3, (0.5,) * 3, rand_augment=recipe)
    img = Image.new('RGB', (40, 28), (10, 120, 250))
    assert views['strong'](img).shape == views['weak'](img).shape == (3, 32, 32)


@pytest.mark.parametrize('recipe', ['rand-m10-n2-mstd0.5', 'fixmatch'])
def test_the_strong_view_takes_the_weak_views_resize_and_flip_but_not_its_translation(recipe):
    # the released strong view: resize, flip, RandAugment (which translates by itself); the weak view's RandomAffine
    # shifted every strong view by up to 28 px more at 224 px
    views = create_uda_transforms(64, (0.5,) * 3, (0.5,) * 3, flip=True, translate=0.125, rand_augment=recipe)
    kinds = {name: [type(t).__name__ for t in views[name].transforms] for name in ('weak', 'strong')}
    assert kinds['weak'][:3] == ['Resize', 'RandomHorizontalFlip', 'RandomAffine']
    assert kinds['strong'][:2] == ['Resize', 'RandomHorizontalFlip'] and 'RandomAffine' not in kinds['strong']
    no_flip = create_uda_transforms(64, (0.5,) * 3, (0.5,) * 3, flip=False, translate=0.0, rand_augment=recipe)
    assert [type(t).__name__ for t in no_flip['weak'].transforms] == ['Resize', 'ToTensor', 'Normalize']
    assert 'RandomHorizontalFlip' not in [type(t).__name__ for t in no_flip['strong'].transforms]
