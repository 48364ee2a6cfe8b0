"""What the DIDA branch costs: every DIDA model against its static twin, and the factored branch against a loop.

Prints, measured side by side in one run on this machine:
1. parameters and MACs (torch's FlopCounterMode) of each DIDA model and its static twin (dida_resnetX vs timm's
   resnetX at 224 px, dida_digitnet(_compact) vs digitnet(_compact) at 32 px);
2. forward latency ratio DIDA / static (eval; ResNets batch 32, digit nets batch 192);
3. training step (forward + backward + SGD step, same batches) as images/s of each and the time ratio, for
   the digit nets and the ResNet depths in --train-depths. 192 is one FixMatch step of the offline recipe
   (4 x 32 source images + two views of 32 target images, forwarded together);
4. the speed-up of the factored DIDA branch over the per-sample-loop reference for a training step
   (forward + backward, batch 64, dida_resnet18's layer4 branch shapes), and the time of the layers the two
   share (1x1 convs, BN, ReLU; the depthwise conv skipped): loop / shared bounds the speed-up that any
   formulation of the dynamic conv can give the whole branch.

Timings alternate the two contenders and report medians, so drift on a shared machine hits both alike; the
ratios carry the quartiles of the per-round ratios in brackets, [q1, q3], to show the run's spread.

    python bench/bench_cost.py                                # everything, ~5 min on 2 CPU cores
    python bench/bench_cost.py --depths 18 50 --reps 5
    python bench/bench_cost.py --branch-only --reps 21
    python bench/bench_cost.py --device cuda --train-depths 18 34 50 101 152
    python bench/bench_cost.py --device cuda --depths 18 --compile reduce-overhead   # CUDA graphs, no launches
    python bench/bench_cost.py --device cuda --depths 18 --triton     # the unit's Triton kernels (eager)
    TRITON_INTERPRET=1 python bench/bench_cost.py --ops-only --triton  # their op counts, on a CPU
    python bench/bench_cost.py --ops-only --device meta     # the ops a GPU's eager forward dispatches, without one
    python bench/bench_cost.py --models-only --reparameterize   # inference forms (timm's reparameterize_model)

On a GPU at these batch sizes the eager ratios are mostly Python and kernel-launch overhead (the branch is many
small ops); `--batch-scale` and `--compile` (every contender compiled alike) show how much, and on a CPU
`--batch-size 2` puts every model in that regime, where each op's call overhead outweighs its arithmetic.
`--triton` builds every DIDA unit with its Triton kernels (dida_timm/layers/dida_triton.py), which run on a GPU;
on a CPU only Triton's interpreter runs them, far too slowly to time, so there `--triton` counts ops only.
"""
import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.utils.model import reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

import dida_timm  # noqa: F401  registers the models
from dida_timm.arguments import at_least, check_options, distinct, usable_device
from dida_timm.layers import DidaBranch, DidaModule, dida_triton
from dida_timm.layers.dida_reference import dida_forward_per_sample
from dida_timm.training.run import describe_hardware


def count_macs(model: torch.nn.Module, input_size: Tuple[int, ...]) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(input_size))
    return counter.get_total_flops() // 2


# ops that only make a new view of their input: no kernel runs for them on any device
VIEW_OPS = frozenset(f'aten::{name}' for name in (
    'view', 'reshape', '_reshape_alias', '_unsafe_view', 'expand', 'expand_as', 'as_strided', 'transpose', 't',
    'permute', 'unbind', 'chunk', 'split', 'select', 'slice', 'narrow', 'squeeze', 'unsqueeze', 'flatten',
    'unflatten', 'view_as', 'alias', 'detach', 'movedim'))


def _views_only(event) -> bool:
    return event.name in VIEW_OPS and all(_views_only(child) for child in event.cpu_children)


# operator namespaces: torch's own and this project's Triton kernels (dida_timm::dynamic_paths: a custom op under
# torch.compile, in eager a profiler range around its output allocations and one kernel launch)
OP_NAMESPACES = ('aten::', 'dida_timm::')


def top_level_ops(fn: Callable[[], None]) -> List[Any]:
    """The top-level ops one call of `fn` runs (CPU profiler events of an operator namespace without an operator
    ancestor): the eager dispatches Python issues. A custom op counts once, whatever it runs inside."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(OP_NAMESPACES):
            parent = parent.cpu_parent
        if event.name.startswith(OP_NAMESPACES) and parent is None:
            ops.append(event)
    return ops


def count_kernel_ops(ops: List[Any]) -> int:
    """How many of `ops` run a kernel (each a launch or more on a GPU): not an op whose whole call tree is views (a
    `reshape` that copies still counts)."""
    return sum(not _views_only(op) for op in ops)


def count_top_level_ops(fn: Callable[[], None], views: bool = True) -> int:
    """The number of top-level aten ops one call of `fn` runs; with `views=False`, of those that run a kernel."""
    ops = top_level_ops(fn)
    return len(ops) if views else count_kernel_ops(ops)


def dida_units(model: torch.nn.Module) -> int:
    return sum(isinstance(m, DidaModule) for m in model.modules())


def paired_times(fns: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each function over `reps` rounds, calls interleaved (CUDA work is waited for)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired_medians(fns: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    return {name: statistics.median(t) for name, t in paired_times(fns, reps, warmup).items()}


def ratio_with_spread(times: Dict[str, List[float]]) -> str:
    """'DIDA / static' as the ratio of the medians, with the quartiles of the per-round ratios in brackets (the
    two calls of a round ran back to back, so their ratio sees the same machine state)."""
    per_round = [d / s for d, s in zip(times['dida'], times['static'])]
    q1, _, q3 = statistics.quantiles(per_round, n=4)
    return f"{statistics.median(times['dida']) / statistics.median(times['static']):.3f} [{q1:.3f}, {q3:.3f}]"


def forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.no_grad():
            model(x)
    return run


def enable_triton_kernels(parser: argparse.ArgumentParser, device: torch.device, untimed: bool = False) -> None:
    """DIDA units built from now on run their Triton kernels (`--triton`): refused unless they run on `device`, a
    CUDA device (or any device under TRITON_INTERPRET=1, when nothing is timed)."""
    runs = dida_triton.triton_runs_on(torch.empty(0, device=device))
    if not runs or (device.type != 'cuda' and not untimed):
        parser.error(f'--triton: timing the kernels needs a CUDA device, got {device} (elsewhere they run only '
                     'under TRITON_INTERPRET=1, for op counts)')
    dida_triton.set_triton_dida(True)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return run


def without_dynamic_conv(module: DidaModule, x: torch.Tensor) -> torch.Tensor:
    """The module with its depthwise conv replaced by a strided view scaled by the codes: the layers the factored
    form and the loop reference share, so loop time / this time bounds any speed-up of the dynamic conv."""
    feat = F.relu(module.conv(x))[:, :, ::module.stride, ::module.stride]
    return torch.cat([module.fuse(feat * code[:, :, None, None]) for code in module.kernel_codes(x)], 1)


BRANCH_FORMS = {'factored': DidaModule.__call__, 'loop': dida_forward_per_sample, 'shared only': without_dynamic_conv}


def branch_step_fn(branch: DidaBranch, x: torch.Tensor, form: str, compile_mode: Optional[str]) -> Callable[[], None]:
    branch.train()
    module_forward = BRANCH_FORMS[form]

    def forward(inp: torch.Tensor) -> torch.Tensor:
        for unit in branch:
            inp = unit.act(unit.bn(module_forward(unit.dida, inp)))
        return inp
    if compile_mode:
        forward = torch.compile(forward, mode=compile_mode)

    def run():
        branch.zero_grad(set_to_none=True)
        forward(x).square().mean().backward()
    return run


def dynamic_conv_step_fn(
        module: DidaModule,
        feat: torch.Tensor,
        x: torch.Tensor,
        per_sample: bool,
        compile_mode: Optional[str],
) -> Callable[[], None]:
    """Only the part the two implementations differ in: the per-sample depthwise conv (+ kernel generation)."""
    def forward(f: torch.Tensor) -> torch.Tensor:
        if per_sample:
            outs = []
            for kernels, dilation, padding in zip(module.generate_kernels(x), module.dilations, module.paddings):
                outs += [F.conv2d(f[n:n + 1], kernels[n].unsqueeze(1), None, module.stride, padding, dilation,
                                  groups=module.reduced_chs) for n in range(f.shape[0])]
            return torch.cat(outs)
        return module.dynamic_conv(f, torch.stack(module.kernel_codes(x), 2).unsqueeze(3))
    if compile_mode:
        forward = torch.compile(forward, mode=compile_mode)

    def run():
        module.zero_grad(set_to_none=True)
        forward(feat.detach().requires_grad_()).square().mean().backward()
    return run


RESNET_DEPTHS = (18, 34, 50, 101, 152)


def model_pairs(depths: List[int], generic: Sequence[str] = ()) -> List[Tuple[str, str, int, int]]:
    """(DIDA model, static twin, image size, batch size) to compare: the DIDA-ResNets of `depths`, the digit nets and
    the registered `dida_<base>` of each timm CNN in `generic`."""
    pairs = [(f'dida_resnet{d}', f'resnet{d}', 224, 32) for d in depths]
    pairs += [('dida_digitnet', 'digitnet', 32, 192), ('dida_digitnet_compact', 'digitnet_compact', 32, 192)]
    return pairs + [(f'dida_{base}', base, 224, 32) for base in generic]


def ops_cells(static: torch.nn.Module, dida: torch.nn.Module, x: torch.Tensor, units: int) -> str:
    """'fwd aten ops (DIDA / static) | extra ops per DIDA unit, all / running a kernel' table cells, counted on warm
    models."""
    ops_s, ops_d = (top_level_ops(forward_fn(m, x)) for m in (static, dida))
    o_s, o_d = len(ops_s), len(ops_d)
    k_s, k_d = count_kernel_ops(ops_s), count_kernel_ops(ops_d)
    return f'{o_d} / {o_s} | {(o_d - o_s) / units:.1f} / {(k_d - k_s) / units:.1f} ({units} units)'


def compiled(models: Dict[str, torch.nn.Module], mode: str) -> Dict[str, torch.nn.Module]:
    """Each model through `torch.compile(mode=mode)`, after a reset of Dynamo's caches: models of one class share
    their forward's code object, whose compiled entries Dynamo caps (8 by default), and a pair past the cap would be
    timed eager without a word."""
    torch._dynamo.reset()
    return {name: torch.compile(model, mode=mode) for name, model in models.items()}


def print_model_table(
        depths: List[int],
        train_depths: List[int],
        reps: int,
        device: torch.device,
        batch_scale: int = 1,
        compile_mode: Optional[str] = None,
        ops_only: bool = False,
        batch_size: Optional[int] = None,
        reparameterize: bool = False,
        generic: Sequence[str] = (),
) -> None:
    """Items 1-3 of the module docstring, one row per DIDA model, with the top-level aten ops of a forward (batches
    times `batch_scale`, or every batch `batch_size`; with `compile_mode`, both models of a pair are timed through
    `torch.compile(mode=compile_mode)`; `ops_only` skips everything but the op counts; `reparameterize` runs both
    models' inference forms, timm's `reparameterize_model`, and skips the training steps; `generic`: timm CNNs whose
    registered DIDA models join the table)."""
    warmup = 3 if compile_mode else 1
    per_unit = 'extra ops per DIDA unit (all / running a kernel)'
    # compiled, the profiler sees the aten ops left outside the generated kernels, not the kernels
    fwd_ops = 'fwd aten ops outside compiled kernels' if compile_mode else 'fwd aten ops'
    if ops_only:
        print(f'| model vs static twin | {fwd_ops} (DIDA / static) | {per_unit} |')
        print('|---|---|---|')
    else:
        print(f'| model vs static twin | params | MACs | extra params | extra MACs | {fwd_ops} (DIDA / static) '
              f'| {per_unit} | fwd latency ratio | train step images/s (static / DIDA) | train-step time ratio |')
        print('|---|---|---|---|---|---|---|---|---|---|')
    untrained = {f'dida_resnet{d}' for d in depths if d not in train_depths}
    for dida_name, static_name, img_size, default_batch in model_pairs(depths, generic):
        batch = batch_size or default_batch * batch_scale
        static, dida = timm.create_model(static_name), timm.create_model(dida_name)
        units = dida_units(dida)
        if not ops_only:
            p_s, p_d = (sum(p.numel() for p in m.parameters()) for m in (static, dida))
            m_s, m_d = (count_macs(m, (1, 3, img_size, img_size)) for m in (static, dida))
        contenders = {'static': static, 'dida': dida}
        if reparameterize:  # the DIDA model's trained form is timed in the same rounds
            contenders = {'static': reparameterize_model(static.eval()), 'dida': reparameterize_model(dida.eval()),
                          'trained': dida}
        contenders = {k: m.to(device) for k, m in contenders.items()}
        if compile_mode:
            contenders = compiled(contenders, compile_mode)
        static, dida = contenders['static'], contenders['dida']
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        if ops_only:
            for m in (static, dida):
                for _ in range(warmup):
                    forward_fn(m, x)()
            print(f'| {dida_name} vs {static_name} | {ops_cells(static, dida, x, units)} |', flush=True)
            continue
        y = torch.randint(0, static.num_classes, (batch,), device=device)
        fwd = paired_times({k: forward_fn(m, x) for k, m in contenders.items()}, reps, warmup)
        latency = f'{ratio_with_spread(fwd)} (b{batch}, {img_size} px)'
        if reparameterize:
            latency += f"; trained form {ratio_with_spread({'static': fwd['static'], 'dida': fwd['trained']})}"
        ops = ops_cells(static, dida, x, units)
        throughput, ratio = '-', '-'
        if not reparameterize and dida_name not in untrained:  # inference forms are not for training
            t = paired_times({'static': train_step_fn(static, x, y), 'dida': train_step_fn(dida, x, y)}, reps,
                             warmup)
            throughput = ' / '.join(f'{batch / statistics.median(t[k]):.0f}' for k in ('static', 'dida'))
            ratio = ratio_with_spread(t)
        print(f'| {dida_name} vs {static_name} | {p_d / 1e6:.2f}M vs {p_s / 1e6:.2f}M '
              f'| {m_d / 1e6:.1f}M vs {m_s / 1e6:.1f}M | +{(p_d - p_s) / p_s:.2%} | +{(m_d - m_s) / m_s:.3%} '
              f'| {ops} | {latency} | {throughput} | {ratio} |',
              flush=True)


def registered_bases(bases: List[str]) -> Optional[str]:
    """The check of an option naming timm CNNs: each has a registered `dida_` twin."""
    unknown = [b for b in bases if not timm.is_model(f'dida_{b}')]
    return f'no registered dida_ model for {unknown} (see timm.list_models("dida_*"))' if unknown else None


def counting_device(ops_only: bool) -> Callable[[str], Optional[str]]:
    """The `--device` check: a device of this machine, or `meta` when only ops are counted."""
    def check(value: str) -> Optional[str]:
        if value == 'meta':
            return None if ops_only else 'meta tensors have no data: they only count ops (--ops-only)'
        return usable_device(value)
    return check


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[18, 34, 50, 101, 152], choices=RESNET_DEPTHS)
    parser.add_argument('--train-depths', type=int, nargs='+', choices=RESNET_DEPTHS,
                        help='ResNet depths (among --depths) whose training step is timed (the digit nets always are; '
                             'default: 18 and 50 where --depths has them)')
    parser.add_argument('--reps', type=int, default=7, help='timed rounds (at least 2: ratios carry their quartiles)')
    parser.add_argument('--device', default='cpu',
                        help='cpu, an accelerator; or meta with --ops-only: tensors without data, so the ops of an '
                             'off-CPU eager forward (the DIDA unit\'s GPU forms) counted on any machine')
    parser.add_argument('--generic', nargs='+', default=[], metavar='BASE',
                        help='also each timm CNN BASE beside its registered dida_BASE (224 px, batch 32), e.g. '
                             'convnext_atto efficientnet_b0')
    parser.add_argument('--branch-only', action='store_true', help='only the factored-vs-loop branch timings (4.)')
    parser.add_argument('--models-only', action='store_true', help='only the model table (1.-3.)')
    parser.add_argument('--batch-scale', type=int, default=1, help='multiply the model table\'s batch sizes')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='run every model of the table at this batch instead (2: call overhead dominates)')
    parser.add_argument('--compile', default=None, metavar='MODE',
                        help='time every contender through torch.compile(mode=MODE), e.g. default, reduce-overhead')
    parser.add_argument('--ops-only', action='store_true',
                        help='only count the top-level aten ops of each model\'s forward (seconds, no timing)')
    parser.add_argument('--reparameterize', action='store_true',
                        help='both models of each pair in their inference forms (timm\'s reparameterize_model: the '
                             'DIDA units\' conv weights stored, their norms folded); forwards only, params and '
                             'MACs of the trained forms')
    parser.add_argument('--triton', action='store_true',
                        help='DIDA units run their Triton kernels (a CUDA device; on a CPU, --ops-only under '
                             'TRITON_INTERPRET=1)')
    args = parser.parse_args(argv)
    if args.train_depths is None:
        args.train_depths = [d for d in (18, 50) if d in args.depths]
    check_options(parser, args, [('device', counting_device(args.ops_only)), ('depths', distinct),
                                 ('train_depths', distinct), ('reps', at_least(2)), ('batch_scale', at_least(1)),
                                 ('batch_size', at_least(2)), ('generic', registered_bases)])
    if args.branch_only and (args.models_only or args.ops_only):
        parser.error('--branch-only: the branch timings are not part of the model table (--models-only, --ops-only)')
    if args.reparameterize and (args.branch_only or args.triton):
        parser.error('--reparameterize: the inference forms run no Triton kernels and train no branch (--triton, '
                     '--branch-only)')
    if args.batch_size and args.batch_scale != 1:
        parser.error('--batch-size: sets every batch, so --batch-scale cannot scale them too')
    untimed = [d for d in args.train_depths if d not in args.depths]
    if untimed and not (args.branch_only or args.ops_only or args.reparameterize):
        parser.error(f'--train-depths: {untimed} not among --depths {args.depths}, so never timed')
    warmup = 3 if args.compile else 1
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.triton:
        if device.type == 'meta':
            parser.error('--triton: the kernels do not run on the meta device')
        enable_triton_kernels(parser, device, untimed=args.ops_only)
    mode = f', torch.compile(mode={args.compile!r})' if args.compile else ', eager'
    mode += ', DIDA units on their Triton kernels' if args.triton else ''
    mode += ', inference forms (reparameterize_model)' if args.reparameterize else ''
    hardware = 'meta device (op counts, no data)' if device.type == 'meta' else describe_hardware(device)
    print(f'# DIDA cost, {hardware}, torch {torch.__version__}, timm {timm.__version__}'
          f'{mode}\n')

    if not args.branch_only:
        print_model_table(args.depths, args.train_depths, args.reps, device, args.batch_scale, args.compile,
                          args.ops_only, args.batch_size, args.reparameterize, args.generic)
    if args.ops_only or args.models_only:
        return
    print('\n## Factored DIDA branch vs the per-sample-loop reference (training step, batch 64, dida_resnet18 '
          'layer4 branch: 256x14x14 -> 512x7x7, two units)\n')
    branch = DidaBranch(256, 512, 512, depth=2, stride=2).to(device)
    xb = torch.randn(64, 256, 14, 14, device=device)
    t = paired_medians({form: branch_step_fn(branch, xb, form, args.compile) for form in BRANCH_FORMS}, args.reps,
                       warmup)
    print(f"| whole branch (1x1 convs, BN included) | factored {t['factored'] * 1e3:.1f} ms | loop "
          f"{t['loop'] * 1e3:.1f} ms | speed-up {t['loop'] / t['factored']:.2f}x |")
    print(f"| shared layers only (depthwise conv skipped) | {t['shared only'] * 1e3:.1f} ms | bound on any "
          f"dynamic conv: loop / shared {t['loop'] / t['shared only']:.2f}x |")
    module = branch[0].dida
    feat = torch.relu(module.conv(xb)).detach()
    t = paired_medians({'factored': dynamic_conv_step_fn(module, feat, xb, False, args.compile),
                        'loop': dynamic_conv_step_fn(module, feat, xb, True, args.compile)}, args.reps, warmup)
    print(f"| dynamic conv only (unit 1, both dilations) | factored {t['factored'] * 1e3:.1f} ms | loop "
          f"{t['loop'] * 1e3:.1f} ms | speed-up {t['loop'] / t['factored']:.2f}x |")


if __name__ == '__main__':
    main()
