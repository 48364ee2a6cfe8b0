"""What the DIDA branch costs: DIDA-ResNets against timm's ResNets, and the factored branch against a loop.

Prints, measured side by side in one run on this machine:
1. parameters and MACs (torch's FlopCounterMode) of each dida_resnetX and resnetX at 224 px;
2. forward latency ratio dida_resnetX / resnetX (eval, batch 32, 224 px);
3. training-step ratio (forward + backward + SGD step, batch 32, 224 px) for the chosen depths;
4. the speed-up of the factored DIDA branch over the per-sample-loop reference for a training step
   (forward + backward, batch 64, dida_resnet18's layer4 branch shapes).

Timings alternate the two contenders and report medians, so drift on a shared machine hits both alike.

    python bench/bench_dida_resnet.py                 # everything, ~10 min on 2 CPU cores
    python bench/bench_dida_resnet.py --depths 18 50 --reps 5
"""
import argparse
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dida_timm  # noqa: F401  registers the models
from dida_timm.layers import DidaBranch, DidaModule
from dida_timm.layers.dida_reference import dida_forward_per_sample


def count_macs(model: torch.nn.Module, input_size: Tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(input_size))
    return counter.get_total_flops() // 2


def paired_medians(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.no_grad():
            model(x)
    return run


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return run


def branch_step_fn(branch: DidaBranch, x: torch.Tensor, per_sample: bool) -> Callable[[], None]:
    branch.train()

    def forward(inp: torch.Tensor) -> torch.Tensor:
        for unit in branch:
            inp = dida_forward_per_sample(unit.dida, inp) if per_sample else unit.dida(inp)
            inp = unit.act(unit.bn(inp))
        return inp

    def run():
        branch.zero_grad(set_to_none=True)
        forward(x).square().mean().backward()
    return run


def dynamic_conv_step_fn(module: DidaModule, feat: torch.Tensor, x: torch.Tensor, per_sample: bool):
    """Only the part the two implementations differ in: the per-sample depthwise conv (+ kernel generation)."""
    import torch.nn.functional as F

    def run():
        module.zero_grad(set_to_none=True)
        f = feat.detach().requires_grad_()
        if per_sample:
            outs = []
            for kernels, dilation, padding in zip(module.generate_kernels(x), module.dilations, module.paddings):
                outs += [F.conv2d(f[n:n + 1], kernels[n].unsqueeze(1), None, module.stride, padding, dilation,
                                  groups=module.reduced_chs) for n in range(f.shape[0])]
            out = torch.cat(outs)
        else:
            out = torch.cat([
                module.dynamic_conv(f, code, basis, d, p)
                for code, basis, d, p in zip(module.kernel_codes(x), module.kernel_bases(), module.dilations,
                                             module.paddings)])
        out.square().mean().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[18, 34, 50, 101, 152])
    parser.add_argument('--train-depths', type=int, nargs='+', default=[18, 50])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--reps', type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f'# DIDA-ResNet cost, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}, timm {timm.__version__}\n')

    input_size = (1, 3, args.img_size, args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    print(f'| model | params | MACs | extra params | extra MACs | fwd latency ratio (b{args.batch_size}) |'
          f' train-step ratio (b{args.batch_size}) |')
    print('|---|---|---|---|---|---|---|')
    for depth in args.depths:
        static, dida = timm.create_model(f'resnet{depth}'), timm.create_model(f'dida_resnet{depth}')
        p_s, p_d = (sum(p.numel() for p in m.parameters()) for m in (static, dida))
        m_s, m_d = count_macs(static, input_size), count_macs(dida, input_size)
        fwd = paired_medians({'static': forward_fn(static, x), 'dida': forward_fn(dida, x)}, args.reps)
        train = '-'
        if depth in args.train_depths:
            t = paired_medians({'static': train_step_fn(static, x, y), 'dida': train_step_fn(dida, x, y)}, args.reps)
            train = f"{t['dida'] / t['static']:.3f} ({t['static'] * 1e3:.0f} / {t['dida'] * 1e3:.0f} ms)"
        print(f'| dida_resnet{depth} vs resnet{depth} | {p_d / 1e6:.2f}M vs {p_s / 1e6:.2f}M '
              f'| {m_d / 1e9:.3f}G vs {m_s / 1e9:.3f}G | +{(p_d - p_s) / p_s:.2%} | +{(m_d - m_s) / m_s:.3%} '
              f"| {fwd['dida'] / fwd['static']:.3f} ({fwd['static'] * 1e3:.0f} / {fwd['dida'] * 1e3:.0f} ms) "
              f'| {train} |', flush=True)

    print('\n## Factored DIDA branch vs the per-sample-loop reference (training step, batch 64, dida_resnet18 '
          'layer4 branch: 256x14x14 -> 512x7x7, two units)\n')
    branch = DidaBranch(256, 512, 512, depth=2, stride=2)
    xb = torch.randn(64, 256, 14, 14)
    t = paired_medians({'factored': branch_step_fn(branch, xb, False), 'loop': branch_step_fn(branch, xb, True)},
                       args.reps)
    print(f"| whole branch (1x1 convs, BN included) | factored {t['factored'] * 1e3:.1f} ms | loop "
          f"{t['loop'] * 1e3:.1f} ms | speed-up {t['loop'] / t['factored']:.2f}x |")
    module = branch[0].dida
    feat = torch.relu(module.conv(xb)).detach()
    t = paired_medians({'factored': dynamic_conv_step_fn(module, feat, xb, False),
                        'loop': dynamic_conv_step_fn(module, feat, xb, True)}, args.reps)
    print(f"| dynamic conv only (unit 1, both dilations) | factored {t['factored'] * 1e3:.1f} ms | loop "
          f"{t['loop'] * 1e3:.1f} ms | speed-up {t['loop'] / t['factored']:.2f}x |")


if __name__ == '__main__':
    main()
