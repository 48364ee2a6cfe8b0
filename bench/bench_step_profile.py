"""Where a DIDA model's extra training-step time goes on a GPU: device work or launches.

For each DIDA model and its static twin (the pairs of bench/bench_cost.py), one training step (forward, backward,
SGD step, the batch sizes of bench_cost.py) is timed in alternating rounds, then a few steps of each run under the
torch profiler. Prints, side by side in one run:

- the step's wall time (median of the rounds) and the DIDA / static ratio;
- the time the device spends in kernels per step, and its ratio: the ratio the step would have if nothing but
  kernel time counted (about what CUDA graphs, `--compile reduce-overhead`, can reach);
- kernels, launch calls and memcpy/memset calls per step;
- the kernels whose time per step grows the most from the static twin to the DIDA model.

A step whose wall time is far above its kernel time is bound by the host (Python, dispatch, launches): there the
DIDA model's extra launches, not its extra arithmetic, set the ratio. On a CPU there are no device kernels, so only
the wall times are printed.

    python bench/bench_step_profile.py --device cuda
    python bench/bench_step_profile.py --device cuda --compile default
    python bench/bench_step_profile.py --device cuda --triton --models dida_digitnet_compact
"""
import argparse
import statistics
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_cost import (RESNET_DEPTHS, compiled, enable_triton_kernels, model_pairs, paired_times, ratio_with_spread,
                        train_step_fn)
from dida_timm.arguments import at_least, check_options, usable_device
from dida_timm.training.run import describe_hardware


def known_models(names: List[str]) -> Optional[str]:
    """The `--models` check: each is a DIDA model of bench_cost.py's table."""
    table = {pair[0] for pair in model_pairs(list(RESNET_DEPTHS))}
    unknown = [n for n in names if n not in table]
    return f'{unknown} not among {sorted(table)}' if unknown else None


def step_profile(step: Callable[[], None], steps: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per-step counts (kernels, launches, copies) and device microseconds per kernel name over `steps` steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counts = {'kernels': 0., 'launches': 0., 'copies': 0.}
    kernel_us: Dict[str, float] = {}
    for event in prof.events():
        kind = event_kind(event)
        if kind:
            counts[kind] += 1 / steps
        if kind == 'kernels':
            kernel_us[event.name] = kernel_us.get(event.name, 0.) + event.device_time / steps
    return counts, kernel_us


def event_kind(event: Any) -> Optional[str]:
    """'kernels' (a kernel's run on the device), 'copies' (a memcpy or memset on the device), 'launches' (a host call
    that launches a kernel) or None for a profiler event.

    The device's timeline also holds the spans of user-annotated ranges (`Optimizer.step#SGD.step`, the Triton
    operator's range), each covering kernels that are events of their own: they are not kernels, and their time
    would count the kernels' twice.
    """
    if event.device_type == DeviceType.CUDA:
        activity = getattr(event, 'activity_type', None)  # an older torch has none: then the name tells the copies
        if getattr(event, 'is_user_annotation', False) or activity == 'gpu_user_annotation':
            return None
        copy_names = activity is None and event.name.startswith(('Memcpy', 'Memset'))
        if activity in ('gpu_memcpy', 'gpu_memset') or copy_names:
            return 'copies'
        return 'kernels' if activity in (None, 'kernel') else None
    return 'launches' if 'LaunchKernel' in event.name or 'cuLaunch' in event.name else None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='an accelerator (on a CPU only wall times are printed)')
    parser.add_argument('--models', nargs='+', default=['dida_digitnet_compact', 'dida_resnet18'],
                        help='DIDA models of bench_cost.py\'s table, each profiled beside its static twin')
    parser.add_argument('--reps', type=int, default=21, help='timed rounds (at least 2: ratios carry quartiles)')
    parser.add_argument('--steps', type=int, default=5, help='profiled steps per model')
    parser.add_argument('--compile', default=None, metavar='MODE', help='both models through torch.compile(mode)')
    parser.add_argument('--triton', action='store_true', help='DIDA units run their Triton kernels (CUDA)')
    parser.add_argument('--top', type=int, default=8, help='kernels listed whose time grows the most')
    args = parser.parse_args(argv)
    check_options(parser, args, [('device', usable_device), ('models', known_models), ('reps', at_least(2)),
                                 ('steps', at_least(1)), ('top', at_least(0))])
    device = torch.device(args.device)
    if args.triton:
        enable_triton_kernels(parser, device)
    mode = f'torch.compile(mode={args.compile!r})' if args.compile else 'eager'
    mode += ', DIDA units on their Triton kernels' if args.triton else ''
    print(f'# DIDA training step profile, {describe_hardware(device)}, torch {torch.__version__}, timm '
          f'{timm.__version__}, {mode}\n')
    print('| model vs static twin | step ms (static / DIDA) | step ratio | kernel ms (static / DIDA) | kernel ratio '
          '| kernels per step | launches per step | memcpy/memset per step |')
    print('|---|---|---|---|---|---|---|---|')
    warmup = 3 if args.compile else 1
    extra_kernels = []
    for dida_name, static_name, img_size, batch in model_pairs(list(RESNET_DEPTHS)):
        if dida_name not in args.models:
            continue
        torch.manual_seed(0)
        models = {'static': timm.create_model(static_name).to(device), 'dida': timm.create_model(dida_name).to(device)}
        if args.compile:
            models = compiled(models, args.compile)
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        y = torch.randint(0, models['static'].num_classes, (batch,), device=device)
        steps = {k: train_step_fn(m, x, y) for k, m in models.items()}
        times = paired_times(steps, args.reps, warmup)
        (c_s, us_s), (c_d, us_d) = (step_profile(steps[k], args.steps) for k in ('static', 'dida'))
        k_s, k_d = sum(us_s.values()) / 1e3, sum(us_d.values()) / 1e3
        step_cells = (f"{statistics.median(times['static']) * 1e3:.2f} / {statistics.median(times['dida']) * 1e3:.2f} "
                      f"| {ratio_with_spread(times)}")
        device_cells = '- | - | - | - | -'  # a CPU: no device kernels
        if k_s:
            device_cells = ' | '.join([f'{k_s:.2f} / {k_d:.2f}', f'{k_d / k_s:.3f}'] + [
                f'{c_s[key]:.0f} / {c_d[key]:.0f}' for key in ('kernels', 'launches', 'copies')])
        print(f'| {dida_name} vs {static_name} | {step_cells} | {device_cells} |', flush=True)
        grown = sorted(((us_d[name] - us_s.get(name, 0.), name) for name in us_d), reverse=True)[:args.top]
        extra_kernels.append((dida_name, [(us, name) for us, name in grown if us > 0]))
    for dida_name, grown in extra_kernels:
        if grown:
            print(f'\nKernels whose time per step grows the most, {dida_name} over its static twin:')
            for us, name in grown:
                print(f'  +{us:7.1f} us  {name[:120]}')


if __name__ == '__main__':
    main()
