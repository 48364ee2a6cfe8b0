"""Readers of real dataset layouts and of a user's folders, on tiny fixture trees built here."""
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dida_timm.data import UNLABELLED, create_domain_datasets, read_class_folders, read_unlabelled_folder


def _image(path: Path, value: int = 128, mode: str = 'RGB') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 5), value if mode != 'RGB' else (value, value, value)).save(path)
    return path


def _domain(root: Path, classes, per_class: int = 2) -> Path:
    for c in classes:
        for i in range(per_class):
            _image(root / c / f'{c}_{i}.png', value=10 * i)
    return root


def test_folder_domains_share_the_class_map_by_name(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog', 'fox'])
    _domain(tmp_path / 'b', ['cat', 'dog', 'fox'])
    a, b = create_domain_datasets('folder', tmp_path, ['a', 'b'], 'train')
    assert a.classes == b.classes == ['cat', 'dog', 'fox']
    assert [b.classes[t] for t in b.targets] == [p.parent.name for p in b.paths]


@pytest.mark.parametrize('splits, split', [(['train', 'valid', 'test'], 'valid'), (['Train', 'Test'], 'test'),
                                           (['training', 'testing'], 'training')])
def test_split_folders_as_exports_name_them_are_read_as_splits_not_classes(tmp_path, splits, split):
    for name in splits:
        _domain(tmp_path / 'photos' / name, ['cat', 'dog'])
    for asked in splits if split != 'valid' else ['train', 'valid']:
        ds, = create_domain_datasets('folder', tmp_path, ['photos'], asked.lower())
        assert ds.classes == ['cat', 'dog'] and {p.parent.parent.name for p in ds.paths} == {asked}
    with pytest.raises(FileNotFoundError, match='split .unlabeled. of domain .photos. not found'):
        create_domain_datasets('folder', tmp_path, ['photos'], 'unlabeled')


def test_folder_domain_with_split_folders_reads_the_split(tmp_path):
    _domain(tmp_path / 'a' / 'train', ['cat', 'dog'], per_class=3)
    _domain(tmp_path / 'a' / 'test', ['cat', 'dog'], per_class=1)
    train, = create_domain_datasets('folder', tmp_path, ['a'], 'train')
    test, = create_domain_datasets('folder', tmp_path, ['a'], 'test')
    assert (train.classes, len(train), len(test)) == (['cat', 'dog'], 6, 2)


def test_a_class_named_like_a_split_stays_a_class(tmp_path):
    # VisDA-2017 and DomainNet have a class 'train': its folder was taken for the domain's train split
    _domain(tmp_path / 'a', ['aeroplane', 'train', 'truck'])
    _domain(tmp_path / 'b' / 'train', ['seq1'])  # a class's images may sit in sub-folders of it
    _domain(tmp_path / 'b' / 'aeroplane', ['seq1'])
    _domain(tmp_path / 'b' / 'truck', ['seq1'])
    for domain in ('a', 'b'):
        ds, = create_domain_datasets('folder', tmp_path, [domain], 'train')
        assert ds.classes == ['aeroplane', 'train', 'truck'] and len(ds) == 6
        assert [ds.classes[t] for t in ds.targets] == [p.parent.name for p in ds.paths] if domain == 'a' else \
            [ds.classes[t] for t in ds.targets] == [p.parent.parent.name for p in ds.paths]


def test_target_missing_a_class_is_refused_not_shifted(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog', 'fox'])
    _domain(tmp_path / 'b', ['cat', 'fox'])
    with pytest.raises(ValueError, match=r"b lacks images of classes \['dog'\]"):
        create_domain_datasets('folder', tmp_path, ['a', 'b'], 'train')


def test_missing_class_can_be_allowed_and_labels_stay_tied_to_names(tmp_path):
    _domain(tmp_path / 'b', ['cat', 'fox'])
    ds = read_class_folders(tmp_path / 'b', 'b', classes=['cat', 'dog', 'fox'], allow_missing_classes=True)
    assert sorted(set(ds.targets.tolist())) == [0, 2]


def test_unknown_class_folder_is_refused(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    _domain(tmp_path / 'b', ['cat', 'dog', 'owl'])
    with pytest.raises(ValueError, match=r"class folders not in the class map .*\['owl'\]"):
        create_domain_datasets('folder', tmp_path, ['a', 'b'], 'train')


def test_empty_domain_and_empty_class_folder_are_refused(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    (tmp_path / 'b' / 'cat').mkdir(parents=True)
    (tmp_path / 'b' / 'dog').mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lacks images of classes \['cat', 'dog'\] \(class folders without images "
                                         r"\['cat', 'dog'\]\): every domain of a run needs"):
        create_domain_datasets('folder', tmp_path, ['a', 'b'], 'train')
    (tmp_path / 'c').mkdir()
    with pytest.raises(ValueError, match='has no images'):
        read_unlabelled_folder(tmp_path / 'c', 'c', ['cat', 'dog'])


def test_missing_domain_folder_names_the_path(tmp_path):
    _domain(tmp_path / 'a', ['cat'])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nope')):
        create_domain_datasets('folder', tmp_path, ['a', 'nope'], 'train')


def test_non_image_files_are_skipped_and_counted(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    (tmp_path / 'a' / 'cat' / 'notes.txt').write_text('x')
    ds = read_class_folders(tmp_path / 'a', 'a')
    assert len(ds) == 4 and ds.skipped == 1


def test_unreadable_image_error_names_the_file(tmp_path):
    _domain(tmp_path / 'a', ['cat'])
    broken = tmp_path / 'a' / 'cat' / 'zz_broken.png'
    broken.write_bytes(b'not a png')
    ds = read_class_folders(tmp_path / 'a', 'a')
    with pytest.raises(OSError, match='zz_broken.png'):
        ds[len(ds) - 1]


def test_images_in_hidden_folders_are_not_read(tmp_path):
    _image(tmp_path / 'new' / 'a.png')
    _image(tmp_path / 'new' / '.ipynb_checkpoints' / 'a-checkpoint.png')  # a copy, which was predicted and trained on
    ds = read_unlabelled_folder(tmp_path / 'new', 'new', ['cat'])
    assert [p.name for p in ds.paths] == ['a.png'] and ds.skipped == 0


def test_a_visible_link_to_a_hidden_folder_is_read(tmp_path):
    # the hidden folder sorts first: walked, it claimed the real folder, and the link to it was then skipped
    _image(tmp_path / 'new' / '.store' / 'b.png')
    (tmp_path / 'new' / 'photos').symlink_to(tmp_path / 'new' / '.store', target_is_directory=True)
    ds = read_unlabelled_folder(tmp_path / 'new', 'new', ['cat'])
    assert [p.relative_to(tmp_path / 'new').as_posix() for p in ds.paths] == ['photos/b.png']


def test_a_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path, monkeypatch):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    _image(tmp_path / 'a' / 'cat' / 'batch2' / 'c.png')
    listing = os.scandir

    def scandir(path):  # chmod 000 does not stop root, who runs CI
        if Path(path).name in ('batch2', 'lost+found'):
            raise PermissionError(13, 'Permission denied', str(path))
        return listing(path)
    monkeypatch.setattr(os, 'scandir', scandir)
    with pytest.raises(OSError, match=f'cannot list the folder {re.escape(str(tmp_path / "a" / "cat" / "batch2"))}'):
        read_class_folders(tmp_path / 'a', 'a')
    # a mount point's lost+found (root's alone) is the file system's, not the user's: left out unlisted
    (tmp_path / 'a' / 'cat' / 'batch2').rename(tmp_path / 'a' / 'cat' / 'lost+found')
    assert len(read_class_folders(tmp_path / 'a', 'a')) == 4


@pytest.mark.parametrize('damage', ['not an image', 'cut inside a chunk header'])
def test_an_undecodable_image_is_reported_and_left_out_not_raised(tmp_path, damage):
    _image(tmp_path / 'new' / 'a.png')
    broken = tmp_path / 'new' / 'b.png'
    if damage == 'not an image':
        broken.write_bytes(b'not a png')
    else:  # PIL raises SyntaxError for a PNG whose second IDAT chunk header is cut (a partial download)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)).save(broken)
        data = broken.read_bytes()
        first = data.index(b'IDAT') - 4
        broken.write_bytes(data[:first + 12 + struct.unpack('>I', data[first:first + 4])[0] + 6])
    ds = read_unlabelled_folder(tmp_path / 'new', 'new', ['cat'])
    readable, unreadable = ds.without_unreadable()
    assert [p.name for p in readable.paths] == ['a.png'] and [p.name for p, _ in unreadable] == ['b.png']
    with pytest.raises(OSError, match='cannot read image .*b.png'):
        ds.load(1)


def test_a_photo_loads_upright_as_its_exif_orientation_says(tmp_path):
    path = tmp_path / 'a' / 'cat' / 'photo.jpg'
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, to be shown turned 90 degrees
    Image.new('RGB', (32, 16)).save(path, exif=exif)
    assert read_class_folders(tmp_path / 'a', 'a').load(0).size == (16, 32)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK', 'I;16'])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / 'a' / 'cat' / 'img.png'
    path.parent.mkdir(parents=True)
    if mode == 'I;16':
        # 16-bit levels spread over the range: level 257 k + 128 is 8-bit level k
        Image.fromarray((257 * np.arange(0, 240, 8).reshape(5, 6) + 128).astype(np.uint16)).save(path)
    elif mode == 'CMYK':
        path = path.with_suffix('.jpg')
        Image.new('CMYK', (6, 5), (0, 0, 0, 0)).save(path)
    else:
        _image(path, 200, mode)
    img, label = read_class_folders(tmp_path / 'a', 'a')[0]
    assert img.mode == 'RGB' and label == 0
    if mode == 'I;16':
        # rescaled, not clipped (which gives 255 from level 255 on) nor wrapped
        assert np.array_equal(np.asarray(img)[..., 0], np.arange(0, 240, 8).reshape(5, 6))


@pytest.mark.parametrize('mode, key', [('L', 255), ('RGB', (255, 255, 255)), ('P', 0), ('RGBA', None)])
def test_a_transparent_image_is_composited_on_black_however_its_png_stores_it(tmp_path, mode, key):
    # a colour key (tRNS) in an L or RGB PNG, as an optimiser may write it, is transparency like an alpha channel
    path = tmp_path / 'a' / 'cat' / 'logo.png'
    path.parent.mkdir(parents=True)
    if key is None:
        Image.new('RGBA', (8, 8), (255, 255, 255, 0)).save(path)
    else:
        img = Image.new(mode, (8, 8), 'white' if mode != 'P' else 0)
        if mode == 'P':
            img.putpalette([255, 255, 255] * 256)
        img.save(path, transparency=key)
    img, _ = read_class_folders(tmp_path / 'a', 'a')[0]
    assert np.asarray(img).max() == 0


def test_unlabelled_folder_reads_every_image_without_labels(tmp_path):
    _image(tmp_path / 'new' / 'x.jpg')
    _image(tmp_path / 'new' / 'sub' / 'y.png')
    ds = read_unlabelled_folder(tmp_path / 'new', 'new', ['cat', 'dog'])
    assert len(ds) == 2 and set(ds.targets.tolist()) == {UNLABELLED}


def _pacs(root: Path) -> Path:
    classes = ['dog', 'elephant']
    for domain in ('photo', 'sketch'):
        for kind in ('train', 'crossval', 'test'):
            lines = []
            for label, c in enumerate(classes, 1):
                rel = f'{domain}/{c}/{kind}_{c}.jpg'
                _image(root / 'images' / rel)
                lines.append(f'{rel} {label}')
            (root / 'splits').mkdir(parents=True, exist_ok=True)
            (root / 'splits' / f'{domain}_{kind}_kfold.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_pacs_reads_official_split_files(tmp_path):
    photo, sketch = create_domain_datasets('pacs', _pacs(tmp_path), ['photo', 'sketch'], 'all')
    assert photo.classes == ['dog', 'elephant'] and len(photo) == 4 and len(sketch) == 4
    assert [photo.classes[t] for t in photo.targets] == [p.parent.name for p in photo.paths]


def test_pacs_all_split_keeps_labels_when_crossval_lacks_a_class(tmp_path):
    # the first domain sets the class map; its crossval file (elephant only), read with its own, mapped elephant to 0
    root = _pacs(tmp_path)
    (root / 'splits' / 'photo_crossval_kfold.txt').write_text('photo/elephant/crossval_elephant.jpg 2\n')
    photo, = create_domain_datasets('pacs', root, ['photo'], 'all')
    assert photo.classes == ['dog', 'elephant'] and len(photo) == 3
    assert [photo.classes[t] for t in photo.targets] == [p.parent.name for p in photo.paths]


def test_pacs_split_file_with_inconsistent_labels_is_refused(tmp_path):
    root = _pacs(tmp_path)
    split = root / 'splits' / 'photo_train_kfold.txt'
    split.write_text(split.read_text() + 'photo/dog/crossval_dog.jpg 2\n')
    with pytest.raises(ValueError, match=r'photo_train_kfold.txt:3: class .dog. has label 2'):
        create_domain_datasets('pacs', root, ['photo'], 'train')


def test_split_file_naming_a_missing_image_is_refused(tmp_path):
    root = _pacs(tmp_path)
    split = root / 'splits' / 'photo_test_kfold.txt'
    split.write_text(split.read_text() + 'photo/dog/ghost.jpg 1\n')
    with pytest.raises(FileNotFoundError, match='ghost.jpg'):
        create_domain_datasets('pacs', root, ['photo'], 'test')


def test_malformed_split_line_is_refused(tmp_path):
    root = _pacs(tmp_path)
    (root / 'splits' / 'photo_test_kfold.txt').write_text('photo/dog/test_dog.jpg\n')
    with pytest.raises(ValueError, match='expected "<image path> <integer label>"'):
        create_domain_datasets('pacs', root, ['photo'], 'test')


def test_domainnet_reads_official_lists(tmp_path):
    lines = []
    for label, c in enumerate(['apple', 'bee']):
        rel = f'clipart/{c}/clipart_{label}.jpg'
        _image(tmp_path / rel)
        lines.append(f'{rel} {label}')
    (tmp_path / 'clipart_train.txt').write_text('\n'.join(lines))
    ds, = create_domain_datasets('domainnet', tmp_path, ['clipart'], 'train')
    assert ds.classes == ['apple', 'bee'] and ds.targets.tolist() == [0, 1]


def test_office_home_original_and_dassl_layouts(tmp_path):
    _domain(tmp_path / 'orig' / 'Art', ['Bike', 'Pen'])
    ds, = create_domain_datasets('office_home', tmp_path / 'orig', ['Art'], 'test')
    assert len(ds) == 4
    _domain(tmp_path / 'dassl' / 'art' / 'train', ['bike', 'pen'], per_class=3)
    _domain(tmp_path / 'dassl' / 'art' / 'val', ['bike', 'pen'], per_class=1)
    train, = create_domain_datasets('office_home', tmp_path / 'dassl', ['art'], 'train')
    test, = create_domain_datasets('office_home', tmp_path / 'dassl', ['art'], 'test')
    assert (len(train), len(test)) == (6, 2)


def test_digit_five_labels_come_from_file_names(tmp_path):
    for i, label in enumerate([3, 7, 3]):
        _image(tmp_path / 'usps' / 'train_images' / f'{i:05d}_{label}.png')
    ds, = create_domain_datasets('digit_five', tmp_path, ['usps'], 'train')
    assert ds.targets.tolist() == [3, 7, 3] and ds.classes[3] == '3'
    (tmp_path / 'usps' / 'train_images' / '._00000_3.png').write_bytes(b'\x00\x05\x16\x07')  # macOS metadata
    assert len(create_domain_datasets('digit_five', tmp_path, ['usps'], 'train')[0]) == 3
    _image(tmp_path / 'usps' / 'train_images' / 'badname.png')
    with pytest.raises(ValueError, match='badname.png'):
        create_domain_datasets('digit_five', tmp_path, ['usps'], 'train')


def test_unknown_dataset_and_missing_root_are_refused(tmp_path):
    with pytest.raises(ValueError, match='unknown dataset'):
        create_domain_datasets('imagenet', tmp_path, ['a'], 'train')
    with pytest.raises(ValueError, match='needs a root folder'):
        create_domain_datasets('pacs', None, ['photo'], 'train')


def test_split_line_without_a_class_folder_is_refused_naming_the_line(tmp_path):
    _image(tmp_path / 'clipart' / 'apple' / 'a.jpg')
    (tmp_path / 'clipart_train.txt').write_text('clipart/apple/a.jpg 0\nb.jpg 0\n')
    with pytest.raises(ValueError, match=r"clipart_train.txt:2: expected an image path <domain>/<class>/<image>"):
        create_domain_datasets('domainnet', tmp_path, ['clipart'], 'train')


def test_images_in_symlinked_sub_folders_are_read_and_a_link_loop_ends(tmp_path):
    _domain(tmp_path / 'elsewhere', ['batch'], per_class=3)
    _image(tmp_path / 'a' / 'cat' / 'own.png')
    (tmp_path / 'a' / 'cat' / 'linked').symlink_to(tmp_path / 'elsewhere' / 'batch')
    (tmp_path / 'a' / 'cat' / 'loop').symlink_to(tmp_path / 'a' / 'cat')
    ds = read_class_folders(tmp_path / 'a', 'a')
    assert sorted(p.name for p in ds.paths) == ['batch_0.png', 'batch_1.png', 'batch_2.png', 'own.png']


def test_a_link_to_a_missing_image_is_an_unreadable_image_not_left_out_unseen(tmp_path):
    _image(tmp_path / 'target' / 'own.png')
    (tmp_path / 'target' / 'gone.png').symlink_to(tmp_path / 'nowhere.png')
    readable, unreadable = read_unlabelled_folder(tmp_path / 'target', 'target', ['cat']).without_unreadable()
    assert [p.name for p in readable.paths] == ['own.png']
    assert [p.name for p, _ in unreadable] == ['gone.png']
    _domain(tmp_path / 'a', ['cat'], per_class=1)
    (tmp_path / 'a' / 'cat' / 'gone.png').symlink_to(tmp_path / 'nowhere.png')
    labelled = read_class_folders(tmp_path / 'a', 'a')
    with pytest.raises(OSError, match='cannot read image .*gone.png'):
        [labelled.load(i) for i in range(len(labelled))]


def test_a_split_missing_from_a_domains_split_folders_is_refused_not_read_as_classes(tmp_path):
    _domain(tmp_path / 'a' / 'train', ['cat', 'dog'])
    _domain(tmp_path / 'a' / 'val', ['cat', 'dog'])
    with pytest.raises(FileNotFoundError, match=r"split 'test' of domain 'a' not found: .*\['train', 'val'\]"):
        create_domain_datasets('folder', tmp_path, ['a'], 'test')


def test_a_flat_folder_of_images_as_a_labelled_domain_is_refused_for_its_missing_class_folders(tmp_path):
    _image(tmp_path / 'a' / 'x.png')
    for classes in (None, ['cat', 'dog']):
        with pytest.raises(ValueError, match=r"domain 'a' at .*a has no class folders: labelled images go in"):
            create_domain_datasets('folder', tmp_path, ['a'], 'train', classes=classes)


def test_images_beside_the_class_folders_of_a_labelled_domain_are_refused_by_name(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    for name in ('b.png', 'c.JPG', 'd.png', 'e.png'):
        _image(tmp_path / 'a' / name)
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')  # other files there are not images to lose
    _image(tmp_path / 'a' / '.thumb.png')  # nor are hidden files
    with pytest.raises(ValueError, match=r"domain 'a' at .*a has 4 images beside its class folders, in no class "
                                         r"\('b.png', 'c.JPG', 'd.png' and 1 more\): move each into"):
        create_domain_datasets('folder', tmp_path, ['a'], 'train')
    for name in ('b.png', 'c.JPG', 'd.png', 'e.png'):
        (tmp_path / 'a' / name).unlink()
    a, = create_domain_datasets('folder', tmp_path, ['a'], 'train')
    assert len(a) == 4


def test_a_folder_of_images_in_other_formats_than_timms_says_which_suffixes_it_holds(tmp_path):
    for name in ('a.bmp', 'b.TIF', 'c.webp'):
        _image(tmp_path / 'target' / name)
    with pytest.raises(ValueError, match=r"has no images: its 3 files have the suffixes \['.bmp', '.tif', '.webp'\], "
                                         r"none of timm's image extensions \['.jpeg', '.jpg', '.png'\]"):
        read_unlabelled_folder(tmp_path / 'target', 'target', ['0'])


def test_a_class_spelled_in_another_unicode_normalisation_is_named_as_such(tmp_path):
    _domain(tmp_path / 'a', ['caf\u00e9', 'tea'])  # composed, as Linux tools write it
    _domain(tmp_path / 'b', ['cafe\u0301', 'tea'])  # decomposed, as copied from macOS
    with pytest.raises(ValueError, match="differ only in Unicode normalisation"):
        create_domain_datasets('folder', tmp_path, ['a', 'b'], 'train')


def test_a_split_file_saved_with_a_byte_order_mark_reads_its_first_line(tmp_path):
    _image(tmp_path / 'clipart' / 'apple' / 'a.jpg')
    (tmp_path / 'clipart_train.txt').write_text('\ufeffclipart/apple/a.jpg 0\r\n', encoding='utf-8')
    ds, = create_domain_datasets('domainnet', tmp_path, ['clipart'], 'train')
    assert ds.paths == [tmp_path / 'clipart' / 'apple' / 'a.jpg']


def test_a_class_the_first_domain_lacks_is_blamed_on_that_domain_not_the_complete_one(tmp_path):
    _domain(tmp_path / 'red', ['circle', 'square'])
    _domain(tmp_path / 'green', ['circle', 'square', 'triangle'])
    with pytest.raises(ValueError, match=r"The class map is the first domain's \('red'\), which has no folder for "
                                         r"\['triangle'\]: every domain needs the same class folders"):
        create_domain_datasets('folder', tmp_path, ['red', 'green'], 'train')
    # given the class map, a domain with a folder outside it is the one named
    with pytest.raises(ValueError, match=r"green has class folders not in the class map \['circle', 'square'\]: "
                                         r"\['triangle'\]$"):
        create_domain_datasets('folder', tmp_path, ['green'], 'train', classes=['circle', 'square'])


def test_a_class_folder_whose_files_all_have_other_suffixes_says_which(tmp_path):
    _domain(tmp_path / 'a', ['cat', 'dog'])
    for i in range(2):
        (tmp_path / 'a' / 'dog' / f'dog_{i}.png').rename(tmp_path / 'a' / 'dog' / f'dog_{i}.webp')
    with pytest.raises(ValueError, match=r"class folders without images \['dog'\]: its 2 files have the suffixes "
                                         r"\['.webp'\], none of timm's image extensions"):
        create_domain_datasets('folder', tmp_path, ['a'], 'train')
