"""Readers for domain-adaptation datasets in their standard local layouts, and for a user's own folders.

Every reader returns `DomainDataset`s whose labels index ONE class map shared by all domains of a run.
Mismatched data is refused with an error naming the path, never "fixed" by re-numbering classes:
a domain missing a class, a class folder unknown to the class map, an empty domain, a split file naming a
missing image or disagreeing with its own labels. Files without an image extension in class folders are
skipped and listed (`FileDomainDataset.skipped_paths`); a file with an image extension that cannot be decoded
raises an error naming it when it is loaded.

Layouts (`root` is the dataset folder):
- `folder`: root/<domain>/<class>/<image>, one ImageFolder per domain (a user's own data). A domain given as
  `unlabelled_domains` may be a flat folder of images (labels unknown).
- `pacs`: root/images/<domain>/<class>/..., root/splits/<domain>_{train,crossval,test}_kfold.txt
  (official split files; split 'all' = train + crossval, Dassl's target split).
- `office_home`: root/<Domain>/<Class>/... (original release; every split is the whole domain) or Dassl's
  root/<domain>/{train,val}/<class>/....
- `domainnet`: root/<domain>/<class>/... with the official lists root/[splits/]<domain>_{train,test}.txt.
- `digit_five`: Dassl's root/<domain>/{train_images,test_images}/<index>_<label>.<ext>.
- `offline_digits`: the built-in offline benchmark (`dida_timm.data.offline_digits`), built on first use.
"""
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from timm.data.readers.img_extensions import get_img_extensions

from .domain_dataset import UNLABELLED, ArrayDomainDataset, DomainDataset, FileDomainDataset
from .offline_digits import DOMAINS as OFFLINE_DOMAINS

__all__ = ['DATASETS', 'DATASET_DOMAINS', 'create_domain_datasets', 'dataset_domains', 'default_domains',
           'file_suffixes', 'read_class_folders', 'read_unlabelled_folder']

PathLike = Union[str, Path]


class UnknownClassesError(ValueError):
    """A domain's class folders that the run's class map lacks (`unknown`, their names)."""

    def __init__(self, message: str, unknown: List[str]):
        super().__init__(message)
        self.unknown = unknown


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in get_img_extensions(as_set=True)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f'{what} not found: {path}')
    return path


def _refuse_unlisted(error: OSError) -> None:
    raise OSError(f'cannot list the folder {error.filename} ({error.strerror or error}): its images would be left '
                  'out') from error


def _files_under(folder: Path) -> List[Path]:
    """Every entry under `folder` that is not a folder, hidden ones and hidden folders (such as .ipynb_checkpoints/
    with its copies) left out, through symlinked folders too (`Path.rglob` does not enter them, silently leaving out
    the images of a class assembled from links); each real folder is read once, so a link to an ancestor does not
    loop.

    Raises:
        OSError: naming a folder that cannot be listed.
    """
    files, seen = [], set()
    for top, dirs, names in os.walk(folder, onerror=_refuse_unlisted, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        # hidden folders are pruned before they are walked: read first, one would claim the real folder that a
        # visible link also reaches; sorted, which of two links to a folder is read does not depend on the listing
        # (a file system's lost+found, unreadable to users at a mount point, holds no images of theirs either)
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != 'lost+found')
        files += [Path(top) / name for name in names if not name.startswith('.')]
    return files


def _images_under(folder: Path) -> Tuple[List[Path], List[Path]]:
    """Image files anywhere under `folder` (sorted; hidden files and folders ignored) and the other files."""
    # a link whose target is gone stays in: an image that cannot be read is reported as such, not left out unseen
    files = [p for p in sorted(_files_under(folder)) if p.is_file() or p.is_symlink()]
    images = [p for p in files if _is_image(p)]
    return images, [p for p in files if not _is_image(p)]


def file_suffixes(paths: Sequence[Path]) -> List[str]:
    """The distinct suffixes of `paths`, lower-cased and sorted ('(none)' for a name without one)."""
    return sorted({p.suffix.lower() or '(none)' for p in paths})


def _not_images(skipped: List[Path]) -> str:
    """What a folder without images holds instead, for its error: files of other suffixes than timm's image ones."""
    if not skipped:
        return ''
    return (f': its {len(skipped)} files have the suffixes {file_suffixes(skipped)[:8]}, none of timm\'s image '
            f'extensions {sorted(get_img_extensions(as_set=True))} (timm.data.add_img_extensions adds one)')


def _class_dirs(root: Path) -> Dict[str, Path]:
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith('.')}


def read_class_folders(
        root: PathLike,
        domain: str,
        classes: Optional[Sequence[str]] = None,
        allow_missing_classes: bool = False,
        transform: Optional[Callable] = None,
) -> FileDomainDataset:
    """One domain in ImageFolder layout: root/<class>/<image> (images may sit in sub-folders of a class).

    Args:
        root: The domain's folder.
        domain: Domain name.
        classes: The run's class map; None takes this folder's sorted class folders.
        allow_missing_classes: Accept a domain lacking some classes (e.g. a small target test set); labels
            still follow the class map by name.
        transform: Image transform.
    """
    root = _require_dir(Path(root), f'domain {domain!r} folder')
    found = _class_dirs(root)
    if not found:  # a flat folder of images, say, which would be reported as empty or lacking every class
        raise ValueError(f'domain {domain!r} at {root} has no class folders: labelled images go in {root}/<class>/')
    loose = sorted(p.name for p in root.iterdir() if _is_image(p) and not p.is_dir() and not p.name.startswith('.'))
    if loose:  # no class folder gives them a label, and leaving them out unseen would train on part of the domain
        shown = ', '.join(ascii(n) for n in loose[:3]) + (f' and {len(loose) - 3} more' if len(loose) > 3 else '')
        raise ValueError(f'domain {domain!r} at {root} has {len(loose)} images beside its class folders, in no class '
                         f'({shown}): move each into {root}/<class>/, or out of the domain folder')
    classes = list(classes) if classes is not None else sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        # macOS writes decomposed Unicode (e + combining accent): the same name copied from there differs unseen
        normalised = {unicodedata.normalize('NFC', c): c for c in classes}
        twins = [f'folder {ascii(u)} and class {ascii(normalised[n])}' for u in unknown
                 if (n := unicodedata.normalize('NFC', u)) in normalised]
        hint = f'; {", ".join(twins)} differ only in Unicode normalisation: rename one like the other' if twins else ''
        raise UnknownClassesError(f'{root} has class folders not in the class map {classes}: {unknown}{hint}', unknown)
    samples, skipped, empty, empty_skipped = [], [], [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        images, others = _images_under(found[name])
        skipped += others
        if not images:
            empty.append(name)
            empty_skipped += others
        samples += [(p, label) for p in images]
    absent = sorted(set(classes) - set(found))
    if (absent or empty) and not allow_missing_classes:
        lacks = ([f'no folder for the classes {absent}'] if absent else []) + (
            [f'class folders without images {empty}{_not_images(empty_skipped)}'] if empty else [])
        raise ValueError(f'{root} lacks images of classes {sorted(absent + empty)} ({"; ".join(lacks)}): every '
                         f'domain of a run needs images of every class of its class map {classes}')
    if not samples:
        raise ValueError(f'domain {domain!r} at {root} has no images{_not_images(skipped)}')
    return FileDomainDataset(domain, classes, samples, transform, skipped=skipped)


def read_unlabelled_folder(
        root: PathLike,
        domain: str,
        classes: Sequence[str],
        transform: Optional[Callable] = None,
) -> FileDomainDataset:
    """Every image under `root` (any depth), with unknown labels: a new domain to adapt to."""
    root = _require_dir(Path(root), f'domain {domain!r} folder')
    images, skipped = _images_under(root)
    if not images:
        raise ValueError(f'domain {domain!r} at {root} has no images{_not_images(skipped)}')
    return FileDomainDataset(domain, classes, [(p, UNLABELLED) for p in images], transform, skipped=skipped)


def _read_list(
        list_file: Path,
        image_root: Path,
        domain: str,
        classes: Optional[Sequence[str]],
        class_of: Callable[[str], str],
        transform: Optional[Callable],
) -> FileDomainDataset:
    """A split file of `relative/path label` lines; the class comes from the path, the label must agree."""
    if not list_file.is_file():
        raise FileNotFoundError(f'split file not found: {list_file}')
    entries = []
    # utf-8-sig: a file saved by Windows Notepad starts with a byte-order mark, which would prefix the first path
    for line_no, line in enumerate(list_file.read_text(encoding='utf-8-sig').splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r'-?\d+', parts[1]):
            raise ValueError(f'{list_file}:{line_no}: expected "<image path> <integer label>", got {line!r}')
        try:
            name = class_of(parts[0])
        except IndexError:  # a path too short to hold the class folder
            raise ValueError(f'{list_file}:{line_no}: expected an image path <domain>/<class>/<image>, '
                             f'got {parts[0]!r}') from None
        entries.append((parts[0], name, int(parts[1]), line_no))
    if not entries:
        raise ValueError(f'split file {list_file} lists no images')
    names = sorted({name for _, name, _, _ in entries})
    classes = list(classes) if classes is not None else names
    file_label_of: Dict[str, Tuple[int, int]] = {}
    samples = []
    for rel, name, file_label, line_no in entries:
        if name not in classes:
            raise ValueError(f'{list_file}:{line_no}: class {name!r} is not in the class map {classes}')
        seen = file_label_of.setdefault(name, (file_label, line_no))
        if seen[0] != file_label:
            raise ValueError(
                f'{list_file}:{line_no}: class {name!r} has label {file_label}, but line {seen[1]} gave it {seen[0]}')
        path = image_root / rel
        if not path.is_file():
            raise FileNotFoundError(f'{list_file}:{line_no}: image not found: {path}')
        samples.append((path, classes.index(name)))
    by_label: Dict[int, str] = {}
    for name, (file_label, line_no) in file_label_of.items():
        if by_label.setdefault(file_label, name) != name:
            raise ValueError(f'{list_file}: label {file_label} is used for both {by_label[file_label]!r} and {name!r}')
    return FileDomainDataset(domain, classes, samples, transform)


def _pacs(root: Path, domain: str, split: str, classes, transform) -> DomainDataset:
    files = {'train': ['train'], 'val': ['crossval'], 'test': ['test'], 'all': ['train', 'crossval']}
    if split not in files:
        raise ValueError(f'PACS split must be one of {sorted(files)}, got {split!r}')
    parts = []
    for f in files[split]:
        # the first file's class map for the second too: each file's own sorted names would disagree if one lacked
        # a class, shifting the labels after it
        parts.append(_read_list(root / 'splits' / f'{domain}_{f}_kfold.txt', root / 'images', domain,
                                parts[0].classes if parts else classes, lambda rel: Path(rel).parts[1], transform))
    if len(parts) == 1:
        return parts[0]
    samples = [(p, label) for d in parts for p, label in zip(d.paths, d.targets)]
    return FileDomainDataset(domain, parts[0].classes, samples, transform)


def _office_home(root: Path, domain: str, split: str, classes, transform) -> DomainDataset:
    domain_dir = _require_dir(root / domain, f'Office-Home domain {domain!r}')
    if (domain_dir / 'train').is_dir():  # Dassl's layout with its own split
        sub = {'train': 'train', 'val': 'val', 'test': 'val'}.get(split)
        if sub is None:
            raise ValueError(f"Office-Home (Dassl layout) split must be 'train', 'val' or 'test', got {split!r}")
        domain_dir = domain_dir / sub
    return read_class_folders(domain_dir, domain, classes, transform=transform)


def _domainnet(root: Path, domain: str, split: str, classes, transform) -> DomainDataset:
    if split not in ('train', 'test'):
        raise ValueError(f"DomainNet split must be 'train' or 'test', got {split!r}")
    list_file = root / 'splits' / f'{domain}_{split}.txt'
    if not list_file.is_file():
        list_file = root / f'{domain}_{split}.txt'
    return _read_list(list_file, root, domain, classes, lambda rel: Path(rel).parts[1], transform)


def _digit_five(root: Path, domain: str, split: str, classes, transform) -> DomainDataset:
    sub = {'train': 'train_images', 'test': 'test_images'}.get(split)
    if sub is None:
        raise ValueError(f"Digit-Five split must be 'train' or 'test', got {split!r}")
    folder = _require_dir(root / domain / sub, f'Digit-Five {domain!r} {split} folder')
    classes = list(classes) if classes is not None else [str(i) for i in range(10)]
    samples = []
    # hidden files left out as in class folders: macOS writes a ._<name> companion beside each file on foreign disks
    for path in sorted(p for p in folder.iterdir() if _is_image(p) and not p.name.startswith('.')):
        match = re.fullmatch(r'\d+_(\d+)', path.stem)
        if match is None or match.group(1) not in classes:
            raise ValueError(f'{path}: expected a file named <index>_<label> with a label in {classes}')
        samples.append((path, classes.index(match.group(1))))
    if not samples:
        raise ValueError(f'Digit-Five domain {domain!r} at {folder} has no images')
    return FileDomainDataset(domain, classes, samples, transform)


def _offline_digits(root: Optional[Path], domain: str, split: str, classes, transform, **kwargs) -> DomainDataset:
    from .offline_digits import CLASSES, load_offline_digits
    if domain not in OFFLINE_DOMAINS:
        raise ValueError(f'offline_digits has domains {OFFLINE_DOMAINS}, not {domain!r}')
    if split not in ('train', 'test'):
        raise ValueError(f"offline_digits split must be 'train' or 'test', got {split!r}")
    arrays = load_offline_digits(cache_dir=root, **kwargs)
    return ArrayDomainDataset(domain, CLASSES, arrays[f'{domain}_{split}_images'],
                              arrays[f'{domain}_{split}_labels'], transform)


# split folder names as exports write them (Roboflow's valid/, Kaggle's Train/ and Test/), compared in lower case
_SPLIT_FOLDERS = frozenset({'train', 'training', 'val', 'valid', 'validation', 'test', 'testing', 'all', 'unlabeled',
                            'unlabelled'})


def _folder(root: Path, domain: str, split: str, classes, transform) -> DomainDataset:
    domain_dir = root / domain
    # optional per-split sub-folders, root/<domain>/<split>/<class>/...: only where every sub-folder of the domain is
    # named like a split, since a class may be (VisDA-2017 and DomainNet have a class 'train')
    sub_dirs = sorted(_class_dirs(domain_dir)) if domain_dir.is_dir() else []
    if sub_dirs and all(d.lower() in _SPLIT_FOLDERS | {split.lower()} for d in sub_dirs):
        chosen = [d for d in sub_dirs if d.lower() == split.lower()]
        if not chosen:  # else its split folders would be read as its classes
            raise FileNotFoundError(f'split {split!r} of domain {domain!r} not found: {domain_dir} holds the split '
                                    f'folders {sub_dirs}')
        if len(chosen) > 1:
            raise ValueError(f'{domain_dir} holds the split folders {chosen}, which differ only in case: merge them')
        domain_dir = domain_dir / chosen[0]
    return read_class_folders(domain_dir, domain, classes, transform=transform)


DATASETS = {
    'offline_digits': _offline_digits,
    'folder': _folder,
    'pacs': _pacs,
    'office_home': _office_home,
    'domainnet': _domainnet,
    'digit_five': _digit_five,
}


# the domains of each dataset's standard layout, the default target first (folder: its root's sub-folders)
DATASET_DOMAINS: Dict[str, Tuple[str, ...]] = {
    'offline_digits': ('mnistm_style',) + tuple(d for d in OFFLINE_DOMAINS if d != 'mnistm_style'),
    'pacs': ('art_painting', 'cartoon', 'photo', 'sketch'),
    'office_home': ('Art', 'Clipart', 'Product', 'Real World'),
    'domainnet': ('clipart', 'infograph', 'painting', 'quickdraw', 'real', 'sketch'),
    'digit_five': ('mnist', 'mnist_m', 'svhn', 'syn', 'usps'),
}
# Dassl's Office-Home folders name the same four domains in lower case
_OFFICE_HOME_DASSL = ('art', 'clipart', 'product', 'real_world')


def dataset_domains(dataset: str, root: Optional[PathLike] = None) -> Tuple[str, ...]:
    """The domain names `dataset` accepts; for `folder` (and Dassl's Office-Home) they are read from `root`.

    Raises:
        ValueError: for an unknown dataset, or a `folder` dataset without a readable root.
    """
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}')
    if dataset == 'folder':
        if root is None:
            raise ValueError('the folder dataset needs --data-dir, whose sub-folders are its domains')
        return tuple(_class_dirs(_require_dir(Path(root), 'folder root')))
    if dataset == 'office_home' and root is not None and (Path(root) / _OFFICE_HOME_DASSL[0]).is_dir():
        return _OFFICE_HOME_DASSL
    return DATASET_DOMAINS[dataset]


def default_domains(dataset: str, root: Optional[PathLike] = None, sources: Optional[Sequence[str]] = None,
                    target: Optional[str] = None) -> Tuple[List[str], str]:
    """Sources and target of a run where not given: the dataset's default target (else the first domain not a
    source), and every other domain as a source. `folder` has no defaults: both must be given.

    Raises:
        ValueError: naming the valid domains, for an unknown name or a missing choice.
    """
    domains = dataset_domains(dataset, root)
    for name in list(sources or []) + ([target] if target is not None else []):
        if name not in domains:
            raise ValueError(f'{name!r} is not a domain of {dataset}; its domains are {list(domains)}')
    if dataset == 'folder' and (sources is None or target is None):
        raise ValueError(f'the folder dataset has no default domains: give --source and --target, from the '
                         f'sub-folders of its root {list(domains)}')
    if target is None:
        rest = [d for d in domains if d not in (sources or [])]
        if not rest:
            raise ValueError(f'every domain of {dataset} is a source; give --target')
        target = rest[0]
    if sources is None:
        sources = [d for d in domains if d != target]
    return list(sources), target


def create_domain_datasets(
        dataset: str,
        root: Optional[PathLike],
        domains: Sequence[str],
        split: str,
        transform: Optional[Callable] = None,
        classes: Optional[Sequence[str]] = None,
        **kwargs,
) -> List[DomainDataset]:
    """Read `domains` of `dataset` for `split`, all sharing one class map (the first domain's, if not given).

    Args:
        dataset: One of DATASETS.
        root: The dataset folder (for offline_digits: the cache folder, None for the default).
        domains: Domain names as in the dataset's layout.
        split: Split name ('train', 'test', ... as the dataset defines them).
        transform: Image transform for every domain.
        classes: Class map to enforce; None takes the first domain's classes.
        **kwargs: Builder options of offline_digits (seed, train_size, test_size).
    """
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}')
    if dataset != 'offline_digits':
        if root is None:
            raise ValueError(f'dataset {dataset!r} needs a root folder (--data-dir)')
        root = _require_dir(Path(root), f'{dataset} root')
        if kwargs:
            raise ValueError(f'options {sorted(kwargs)} only apply to offline_digits')
    reader = DATASETS[dataset]
    out = []
    first = None  # the domain whose classes became the class map, when none was given
    for domain in domains:
        try:
            ds = reader(Path(root) if root is not None else None, domain, split, classes, transform, **kwargs)
        except UnknownClassesError as e:
            if first is None:
                raise
            # the domain named has the classes: the one that set the map lacks them
            raise ValueError(f"{e}. The class map is the first domain's ({first!r}), which has no folder for "
                             f'{e.unknown}: every domain needs the same class folders') from e
        if classes is None:
            classes, first = ds.classes, domain
        elif ds.classes != list(classes):
            raise ValueError(f'domain {domain!r} has classes {ds.classes}, other domains {list(classes)}')
        out.append(ds)
    return out
