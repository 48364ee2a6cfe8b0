"""The built-in offline digits benchmark: determinism, balance, splits, caching."""
import re
import struct
import zipfile

import numpy as np
import pytest

from dida_timm.data import create_domain_datasets
from dida_timm.data.offline_digits import DOMAINS, arrays_digest, build_offline_digits, load_offline_digits

SMALL = dict(train_size=60, test_size=20)


@pytest.fixture(scope='module')
def small_benchmark():
    return build_offline_digits(seed=3, **SMALL)


def test_same_seed_gives_identical_arrays(small_benchmark):
    assert arrays_digest(build_offline_digits(seed=3, **SMALL)) == arrays_digest(small_benchmark)
    assert arrays_digest(build_offline_digits(seed=4, **SMALL)) != arrays_digest(small_benchmark)


def test_every_domain_is_32px_rgb_and_class_balanced(small_benchmark):
    for domain in DOMAINS:
        for split, size in (('train', 60), ('test', 20)):
            images, labels = small_benchmark[f'{domain}_{split}_images'], small_benchmark[f'{domain}_{split}_labels']
            assert images.shape == (size, 32, 32, 3) and images.dtype == np.uint8
            assert np.bincount(labels, minlength=10).tolist() == [size // 10] * 10, (domain, split)


def test_domains_differ_in_appearance(small_benchmark):
    means = {d: small_benchmark[f'{d}_train_images'].reshape(-1, 3).mean(0) for d in DOMAINS}
    # MNIST and UCI digits are gray on black; the others are coloured
    for d in ('mnist', 'uci_digits'):
        assert np.ptp(means[d]) < 1e-6
    for d in ('mnistm_style', 'syn_style', 'svhn_style'):
        assert small_benchmark[f'{d}_train_images'].std(-1).mean() > 5
    # and pairwise, by the median image's high-frequency energy (flat colours vs photo texture and noise), its
    # colourfulness and the mean pixel; one renderer drawn twice differs by < 0.5 / 9 / 15 on these draws
    def appearance(images):
        x = images.astype(np.float64)
        energy = np.median(np.abs(np.diff(x, axis=2)).mean((1, 2, 3)))
        colour = np.median((x.max(-1) - x.min(-1)).mean((1, 2)))
        return energy, colour, x.mean()

    stats = {d: appearance(small_benchmark[f'{d}_train_images']) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1:]:
            gaps = [abs(u - v) for u, v in zip(stats[a], stats[b])]
            assert gaps[0] > 2 or gaps[1] > 20 or gaps[2] > 20, (a, b, gaps)


def test_train_and_test_splits_share_no_image(small_benchmark):
    # catches exact duplicates only: a generated image (MNIST-M-style background, printed numbers) never equals
    # another, so the real-digit leak is checked on the images' sources below
    for domain in DOMAINS:
        train = {x.tobytes() for x in small_benchmark[f'{domain}_train_images']}
        test = {x.tobytes() for x in small_benchmark[f'{domain}_test_images']}
        assert not train & test, domain


def test_no_real_digit_is_in_both_the_train_and_the_test_split_of_a_domain():
    sources = {}
    arrays = build_offline_digits(seed=0, train_size=4000, test_size=1000, sources=sources)
    train = {x.tobytes() for x in arrays['mnist_train_images']}
    test = {x.tobytes() for x in arrays['mnist_test_images']}
    assert len(train) == 4000 and len(test) == 1000 and not train & test
    # generated domains never repeat an image byte for byte: compare the real digits the images are made from
    assert set(sources) == {f'{d}_{s}' for d in ('mnist', 'mnistm_style', 'uci_digits') for s in ('train', 'test')}
    for domain in ('mnist', 'mnistm_style', 'uci_digits'):
        train, test = set(sources[f'{domain}_train'].tolist()), set(sources[f'{domain}_test'].tolist())
        assert train and test and not train & test, domain
    # the two MNIST-based domains also keep their test digits out of each other's train split
    assert not set(sources['mnist_train'].tolist()) & set(sources['mnistm_style_test'].tolist())
    assert not set(sources['mnistm_style_train'].tolist()) & set(sources['mnist_test'].tolist())


def test_cache_is_reused_and_equal(tmp_path, small_benchmark):
    messages = []
    first = load_offline_digits(seed=3, cache_dir=tmp_path, log=messages.append, **SMALL)
    second = load_offline_digits(seed=3, cache_dir=tmp_path, log=messages.append, **SMALL)
    assert len(messages) == 1 and arrays_digest(first) == arrays_digest(second) == arrays_digest(small_benchmark)
    assert not list((tmp_path / 'offline_digits').glob('*.tmp*'))


def test_datasets_share_one_class_map(tmp_path):
    datasets = create_domain_datasets('offline_digits', tmp_path, DOMAINS, 'test', seed=3, **SMALL)
    assert all(ds.classes == [str(i) for i in range(10)] for ds in datasets)
    img, label = datasets[0][0]
    assert img.size == (32, 32) and img.mode == 'RGB' and 0 <= label < 10


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match='offline_digits has domains'):
        create_domain_datasets('offline_digits', tmp_path, ['svhn'], 'train', seed=3, **SMALL)


def test_build_command_refuses_a_too_small_size_naming_the_option(monkeypatch, capsys, tmp_path):
    from dida_timm.data.offline_digits import main
    monkeypatch.setattr('sys.argv', ['offline_digits', '--train-size', '5', '--cache-dir', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and 'error: --train-size: ' in capsys.readouterr().err


def _flip_compressed_bytes(path) -> None:
    """Invert 20 bytes inside the first member's compressed data (a disk or copy error that keeps the zip's index)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = archive.infolist()[0]
    name_len, extra_len = struct.unpack('<HH', data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len + 100
    data[start:start + 20] = bytes(255 - b for b in data[start:start + 20])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage', ['partial copy', 'flipped bytes'])
def test_a_damaged_cache_file_is_named_in_the_error(tmp_path, damage):
    load_offline_digits(seed=3, cache_dir=tmp_path, log=lambda _: None, **SMALL)
    path, = (tmp_path / 'offline_digits').glob('*.npz')
    if damage == 'partial copy':
        path.write_bytes(path.read_bytes()[:1000])
    else:  # zlib's own error, not the zip's CRC check, reports this one
        _flip_compressed_bytes(path)
    with pytest.raises(OSError, match=f'cannot read the cached benchmark {re.escape(str(path))}.*delete it'):
        load_offline_digits(seed=3, cache_dir=tmp_path, **SMALL)
