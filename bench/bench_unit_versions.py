"""This checkout's DIDA unit against the unit of another git revision, inside the same models, on this machine.

Builds each DIDA model once and a copy of it whose every `DidaModule` is the class from `git show
REV:dida_timm/layers/dida.py`, with the same weights (the state dicts are the same across revisions), checks that
the two compute the same outputs, and times the static twin, the copy (`then`) and the model (`now`) in
interleaved rounds: a training step (forward + backward + SGD step) at the model table's batch of
bench/bench_cost.py, or at `--batch-size`; with `--reparameterize`, an eval forward of the three models' inference
forms (timm's `reparameterize_model`, each unit reparameterized by its own class). Prints, per model, the ratio of medians to the static twin for both
units with the quartiles of the per-round ratios, and now / then per round, so a change to the unit is measured
side by side rather than across two runs of bench_cost.py.

    python bench/bench_unit_versions.py --rev a02e343
    python bench/bench_unit_versions.py --rev a02e343 --models dida_digitnet_compact --reps 150
    python bench/bench_unit_versions.py --rev a02e343 --batch-size 2 --reps 300   # call-overhead regime
    python bench/bench_unit_versions.py --rev a02e343 --device cuda
    python bench/bench_unit_versions.py --rev 609d1bd --reparameterize --batch-size 2 --reps 300
"""
import argparse
import copy
import subprocess
import types
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from timm.utils.model import reparameterize_model

import dida_timm  # noqa: F401  registers the models
from dida_timm.arguments import at_least, check_options, distinct, usable_device
from dida_timm.layers import DidaModule
from dida_timm.training.run import describe_hardware

from bench_cost import forward_fn, model_pairs, paired_times, ratio_with_spread, train_step_fn

REPO = Path(__file__).resolve().parents[1]
PAIRS = {pair[0]: pair for pair in model_pairs([18, 50])}  # DIDA model -> (it, static twin, image size, batch)


def unit_class(rev: str) -> type:
    """`DidaModule` as defined at git revision `rev`."""
    path = 'dida_timm/layers/dida.py'
    source = subprocess.run(['git', 'show', f'{rev}:{path}'], cwd=REPO, capture_output=True, text=True)
    if source.returncode:
        raise SystemExit(f'--rev: git show {rev}:{path} failed: {source.stderr.strip()}')
    module = types.ModuleType(f'dida_at_{rev}')
    module.__package__ = 'dida_timm.layers'  # its relative imports (e.g. the Triton kernels) are this checkout's
    exec(compile(source.stdout, f'{rev}:{path}', 'exec'), module.__dict__)
    return module.DidaModule


def with_units_of(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A copy of `model` whose DidaModules are instances of `cls` carrying the same weights."""
    model = copy.deepcopy(model)
    for name, unit in list(model.named_modules()):
        if isinstance(unit, DidaModule):
            other = cls(unit.conv.in_channels, unit.fuse.out_channels * len(unit.dilations), stride=unit.stride,
                        reduction=unit.conv.in_channels // unit.reduced_chs, dilations=unit.dilations,
                        kernel_size=unit.kernel_sizes, shared_reduction=unit.shared_reduction, dynamic=unit.dynamic)
            other.load_state_dict(unit.state_dict())  # strict: the same parameters, or an error naming them
            model.set_submodule(name, other)
    return model


def compare(
        name: str, then_cls: type, batch_size: Optional[int], reps: int, device: torch.device, reparameterize: bool,
) -> str:
    """One table row: the static twin, the model with the other revision's units, and the model as it is now."""
    _, static_name, img_size, default_batch = PAIRS[name]
    batch = batch_size or default_batch
    now, static = timm.create_model(name), timm.create_model(static_name)
    then = with_units_of(now, then_cls)
    models = {'static': static, 'then': then, 'now': now}
    if reparameterize:
        models = {k: reparameterize_model(m.eval()) for k, m in models.items()}
    models = {k: m.to(device) for k, m in models.items()}
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, static.num_classes, (batch,), device=device)
    with torch.no_grad():
        diff = (models['then'].eval()(x) - models['now'].eval()(x)).abs().max().item()
    step = (lambda m: forward_fn(m, x)) if reparameterize else (lambda m: train_step_fn(m, x, y))
    times: Dict[str, List[float]] = paired_times({k: step(m) for k, m in models.items()}, reps, warmup=2)
    cells = [ratio_with_spread({'static': times['static'], 'dida': times[k]}) for k in ('then', 'now')]
    cells.append(ratio_with_spread({'static': times['then'], 'dida': times['now']}))
    return f'| {name} (b{batch}, {img_size} px) | {diff:.1e} | ' + ' | '.join(cells) + ' |'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rev', required=True, help='git revision whose DidaModule is timed against this checkout')
    parser.add_argument('--models', nargs='+', default=['dida_resnet18', 'dida_digitnet_compact'], choices=list(PAIRS))
    parser.add_argument('--reps', type=int, default=21, help='timed rounds (at least 2: ratios carry their quartiles)')
    parser.add_argument('--batch-size', type=int, default=None, help='every model at this batch (default: its own)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--reparameterize', action='store_true',
                        help="time eval forwards of the inference forms (timm's reparameterize_model)")
    args = parser.parse_args()
    check_options(parser, args, [('models', distinct), ('reps', at_least(2)), ('batch_size', at_least(2)),
                                 ('device', usable_device)])
    then_cls = unit_class(args.rev)
    torch.manual_seed(0)
    device = torch.device(args.device)
    timed = 'eval forward of the inference forms' if args.reparameterize else 'training step'
    print(f'# {timed}, DIDA unit of {args.rev} (then) vs this checkout (now), {describe_hardware(device)}, '
          f'torch {torch.__version__}, timm {timm.__version__}, {args.reps} interleaved rounds\n')
    print('| model | max output diff | then / static | now / static | now / then |')
    print('|---|---|---|---|---|')
    for name in args.models:
        print(compare(name, then_cls, args.batch_size, args.reps, device, args.reparameterize), flush=True)


if __name__ == '__main__':
    main()
