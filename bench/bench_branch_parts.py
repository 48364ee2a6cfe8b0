"""Where a DIDA model's extra training-step time goes: the parts of its DIDA stages, timed alone.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

A DIDA stage is static blocks + a branch of units (DIDA module -> norm -> act), summed. This times, in the same
interleaved rounds as the training steps of the DIDA model and its static twin, forward + backward (gradients of
the input and every parameter, for a fixed output gradient) of each DIDA stage, its static blocks, its branch and
each DIDA module alone, at the inputs the model's forward gives them. The step difference DIDA - static is about
stage - blocks (the branch, the sum and the input gradient's accumulation); the branch less its modules is the
units' norm and activation, which no formulation of the module removes. Each DIDA module is also timed with its
grouped conv on channels-first features (the layout it keeps on a GPU) instead of the channels-last copy it makes on
CPU.

    python bench/bench_branch_parts.py                                   # dida_digitnet_compact, batch 192
    python bench/bench_branch_parts.py --model dida_resnet18 --batch-size 32 --img-size 224 --reps 15
"""
import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List
from unittest import mock

import timm
import torch

import dida_timm  # noqa: F401  registers the models
from dida_timm.arguments import at_least, check_options
from dida_timm.layers import DidaModule, DidaStage, dida
from dida_timm.training.run import describe_hardware

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cost import paired_times, train_step_fn  # noqa: E402


def backward_fn(module: torch.nn.Module, inp: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of `module` at `inp` for a fixed random output gradient (contiguous, as a norm layer's
    backward gives: an expanded gradient such as that of `.sum()` sends the CPU's bmm down a slow path)."""
    inp = inp.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        grad = torch.randn_like(module(inp))

    def run():
        torch.autograd.grad(module(inp), [inp] + params, grad)
    return run


def channels_first_conv(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` with the DIDA module's grouped conv reading its features in the layout it gets (channels-first), as on a
    GPU, instead of the channels-last copy it makes on CPU: the layout choice, timed."""
    def run():
        with mock.patch.object(dida, '_grouped_conv_input', lambda feat: feat):
            fn()
    return run


def stage_inputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input of every DIDA stage and DIDA module in a forward of `x`, by module name."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (DidaStage, DidaModule)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: inputs.__setitem__(name, args[0].detach())))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='dida_digitnet_compact')
    parser.add_argument('--static', default=None, help='the static twin (default: --model without "dida_")')
    parser.add_argument('--batch-size', type=int, default=192)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--reps', type=int, default=40)
    args = parser.parse_args(argv)
    check_options(parser, args, [('batch_size', at_least(2)), ('img_size', at_least(8)), ('reps', at_least(3))])
    if not args.model.startswith('dida_') and args.static is None:
        parser.error(f'--model: {args.model} is not a dida_ model, so name its static twin with --static')
    static_name = args.static or args.model[len('dida_'):]
    torch.manual_seed(0)
    dida, static = timm.create_model(args.model).train(), timm.create_model(static_name).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, static.num_classes, (args.batch_size,))
    fns = {'static step': train_step_fn(static, x, y), 'DIDA step': train_step_fn(dida, x, y)}
    inputs = stage_inputs(dida, x)
    if not inputs:
        parser.error(f'--model: {args.model} has no DIDA stage')
    for name, module in dida.named_modules():
        if name not in inputs:
            continue
        inp = inputs[name]
        if isinstance(module, DidaStage):
            fns[f'{name}: stage'] = backward_fn(module, inp)
            fns[f'{name}: static blocks'] = backward_fn(module.blocks, inp)
            fns[f'{name}: branch'] = backward_fn(module.branch, inp)
        else:
            fns[f'{name}: DIDA module'] = backward_fn(module, inp)
            fns[f'{name}: DIDA module, conv input channels-first'] = channels_first_conv(backward_fn(module, inp))
    times = {k: statistics.median(v) for k, v in paired_times(fns, args.reps, warmup=2).items()}
    print(f'# {args.model} vs {static_name}, batch {args.batch_size}, {args.img_size} px, {args.reps} rounds; '
          f'{describe_hardware(torch.device("cpu"))}, torch {torch.__version__}\n')
    print('| part (forward + backward) | ms | share of the static step |')
    print('|---|---|---|')
    base = times['static step']
    for name, seconds in times.items():
        print(f'| {name} | {seconds * 1e3:.2f} | {seconds / base:.3f} |')
    extra = times['DIDA step'] - base
    print(f'| DIDA step - static step | {extra * 1e3:.2f} | {extra / base:.3f} |')


if __name__ == '__main__':
    main()
