"""bench/bench_unit_versions.py times the unit of another revision inside the same models, with the same weights."""
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
from bench_unit_versions import unit_class, with_units_of  # noqa: E402

from dida_timm.layers import DidaModule  # noqa: E402

pytestmark = pytest.mark.skipif(
    subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True).returncode != 0,
    reason='needs the git history of a checkout')


def test_every_unit_is_swapped_for_the_revisions_class_with_the_same_weights():
    then_cls = unit_class('HEAD')
    assert then_cls is not DidaModule and then_cls.__name__ == 'DidaModule'
    model = timm.create_model('dida_resnet18', num_classes=5).eval()
    with torch.no_grad():  # a trained-looking branch, so that a unit left at its initial weights would show
        for unit in model.modules():
            if isinstance(unit, DidaModule):
                for p in unit.parameters():
                    p.uniform_(-0.3, 0.3)
    then = with_units_of(model, then_cls)
    units = [m for m in then.modules() if type(m).__name__ == 'DidaModule']
    assert len(units) == 2 and all(type(m) is then_cls for m in units)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(then(x), model(x))


def test_an_unknown_revision_is_refused_by_name():
    with pytest.raises(SystemExit, match='--rev: git show no-such-rev'):
        unit_class('no-such-rev')


def test_inference_forms_are_compared_each_reparameterized_by_its_own_class():
    import bench_unit_versions
    forms = []

    def recording(model):
        deployed = reparameterize_model(model)
        forms.append(deployed)
        return deployed
    with mock.patch.object(bench_unit_versions, 'reparameterize_model', recording):
        row = bench_unit_versions.compare('dida_digitnet_compact', unit_class('HEAD'), 2, 2, torch.device('cpu'),
                                          reparameterize=True)
    units = [[m for m in model.modules() if type(m).__name__ == 'DidaModule'] for model in forms]
    assert [len(u) for u in units] == [0, 1, 1] and type(units[1][0]) is not DidaModule
    assert all(hasattr(u[0], 'paths_weight') for u in units[1:])
    assert float(row.split('|')[2]) <= 1e-5  # the two inference forms compute the same outputs
