"""timm's own model test suite (tests/test_models.py of the installed timm's sdist) run on every model we register.

The sdist is downloaded from PyPI (not vendored); pretrained tests load their weights from a Hugging Face
cache built locally, with the hub offline.
"""
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

from dida_timm_models import our_models
from hf_cache import build_backbone_cache

# suite tests every dida_ architecture (or tag) must pass, with the batch size the suite uses
REQUIRED_PER_MODEL = {
    'test_model_forward': 1, 'test_model_backward': 2, 'test_model_forward_torchscript': 1,
    'test_model_forward_features': 1, 'test_model_forward_intermediates_features': 1,
    'test_model_forward_intermediates': 1, 'test_model_forward_fx': 1, 'test_model_backward_fx': 2,
    'test_model_forward_fx_torchscript': 1,
}
REQUIRED_PER_TAG = {'test_model_default_cfgs': 1}
REQUIRED_PER_PRETRAINED_TAG = {'test_model_load_pretrained': 1, 'test_model_features_pretrained': 1}


@pytest.fixture(scope='module')
def timm_test_models(tmp_path_factory) -> Path:
    """tests/test_models.py from the sdist of the installed timm version, fetched with pip."""
    download_dir = tmp_path_factory.mktemp('timm_sdist')
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
         f'timm=={timm.__version__}', '-d', str(download_dir)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ['no message'])[-1]
        pytest.skip(f"timm's test suite is fetched at run time and the package index could not provide the "
                    f'timm=={timm.__version__} sdist (offline?): pip download said: {why}')
    sdist, = download_dir.glob('timm-*.tar.gz')
    member = f'timm-{timm.__version__}/tests/test_models.py'
    suite_dir = tmp_path_factory.mktemp('timm_suite')
    with tarfile.open(sdist) as tar:
        (suite_dir / 'test_models.py').write_bytes(tar.extractfile(member).read())
    return suite_dir / 'test_models.py'


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_timm_model_suite_passes_for_every_dida_model(timm_test_models, tmp_path):
    hf_cache = tmp_path / 'hf_cache'
    build_backbone_cache(hf_cache, our_models(pretrained=True))
    report = tmp_path / 'report.xml'
    env = dict(
        os.environ,
        HF_HUB_OFFLINE='1',
        HF_HUB_CACHE=str(hf_cache),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')]),
    )
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', str(timm_test_models),
         '-k', ' or '.join(our_models()),
         '-p', 'timm_suite_plugin',
         '-p', 'no:cacheprovider', '-q', '-W', 'ignore::pytest.PytestUnknownMarkWarning',
         '--rootdir', str(timm_test_models.parent), '-o', 'addopts=', f'--junitxml={report}'],
        env=env, capture_output=True, text=True, cwd=timm_test_models.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]

    passed = {
        case.get('name') for case in ET.parse(report).iter('testcase')
        if not any(child.tag in ('failure', 'error', 'skipped') for child in case)
    }
    required = [
        f'{test}[{batch_size}-{name}]'
        for names, tests in (
            (our_models(), REQUIRED_PER_MODEL),
            (our_models(include_tags=True), REQUIRED_PER_TAG),
            (our_models(pretrained=True), REQUIRED_PER_PRETRAINED_TAG),
        )
        for name in names
        for test, batch_size in tests.items()
    ] + [f'test_prune_intermediate_layers_contract[{name}]' for name in our_models()]
    missing = [name for name in required if name not in passed]
    assert not missing, f'timm suite did not run or pass: {missing}\n{result.stdout[-3000:]}'
    print(result.stdout.strip().splitlines()[-1])
