"""Where a DIDA model's extra training-step time goes: the parts of its DIDA stages, timed alone.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

A DIDA stage is static blocks + a branch of units (DIDA module -> norm -> act), summed. This times, in the same
interleaved rounds as the training steps of the DIDA model and its static twin, forward + backward (gradients of
the input and every parameter, for a fixed output gradient) of each DIDA stage, its static blocks, its branch and
each DIDA module alone, at the inputs the model's forward gives them. The step difference DIDA - static is about
stage - blocks (the branch, the sum and the input gradient's accumulation); the branch less its modules is the
units' norm and activation, which no formulation of the module removes. Each DIDA module is also timed with its
grouped conv on channels-first features (the layout it keeps on a GPU) instead of the channels-last copy it makes on
CPU; on a GPU, with its 1x1s as batched matmuls (their CPU form) instead of convs, eager unit and Triton
kernels alike.

    python bench/bench_branch_parts.py                                   # dida_digitnet_compact, batch 192
    python bench/bench_branch_parts.py --model dida_resnet18 --batch-size 32 --img-size 224 --reps 15
    python bench/bench_branch_parts.py --device cuda --triton --reps 100
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
from dida_timm.arguments import at_least, check_options, usable_device
from dida_timm.layers import DidaModule, DidaStage, dida
from dida_timm.layers.dida_triton import dynamic_paths, output_size
from dida_timm.training.run import describe_hardware

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cost import enable_triton_kernels, paired_times, train_step_fn  # noqa: E402


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


def matmul_triton_forward(module: DidaModule, x: torch.Tensor) -> torch.Tensor:
    """`module.forward_triton` with its 1x1s as batched matmuls (the fuse's under `matmul_1x1s`)."""
    pre = dida.pointwise_matmul(x, module.conv.weight, module.conv.bias)
    h, w = pre.shape[2:]
    paths = dynamic_paths(pre.flatten(2), module.generator_tensors(), h, w, module.stride, list(module.dilations))
    return module.fuse_paths(paths.transpose(1, 2), *output_size(h, w, module.stride))


def matmul_1x1s(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` with every DIDA module running its 1x1s as batched matmuls, eager unit and Triton kernels alike: the
    GPU's choice between cuDNN's 1x1 conv and cuBLAS's batched matmul at the unit's few channels, timed."""
    def run():
        with mock.patch.object(dida, 'pointwise_conv', dida.pointwise_matmul), \
                mock.patch.object(DidaModule, 'forward_triton', matmul_triton_forward):
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
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--triton', action='store_true', help='DIDA units run their Triton kernels (a CUDA device)')
    args = parser.parse_args(argv)
    check_options(parser, args, [('batch_size', at_least(2)), ('img_size', at_least(8)), ('reps', at_least(3)),
                                 ('device', usable_device)])
    if not args.model.startswith('dida_') and args.static is None:
        parser.error(f'--model: {args.model} is not a dida_ model, so name its static twin with --static')
    static_name = args.static or args.model[len('dida_'):]
    device = torch.device(args.device)
    if args.triton:
        enable_triton_kernels(parser, device)
    precision = ''
    if device.type == 'cuda':
        # torch's defaults let cuDNN's convs run in TF32 but not cuBLAS's matmuls: the 1x1s as convs or as batched
        # matmuls are compared at the same precision
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        precision = f", TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'} for convs and matmuls alike"
    torch.manual_seed(0)
    dida, static = (timm.create_model(name).to(device).train() for name in (args.model, static_name))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, static.num_classes, (args.batch_size,), device=device)
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
            if inp.is_cpu and not module.use_triton:
                fns[f'{name}: DIDA module, conv input channels-first'] = channels_first_conv(backward_fn(module, inp))
            else:
                fns[f'{name}: DIDA module, 1x1s as batched matmuls'] = matmul_1x1s(backward_fn(module, inp))
    times = {k: statistics.median(v) for k, v in paired_times(fns, args.reps, warmup=2).items()}
    print(f'# {args.model} vs {static_name}, batch {args.batch_size}, {args.img_size} px, {args.reps} rounds; '
          f'{describe_hardware(device)}, torch {torch.__version__}{precision}'
          f'{", DIDA units on their Triton kernels" if args.triton else ""}\n')
    print('| part (forward + backward) | ms | share of the static step |')
    print('|---|---|---|')
    base = times['static step']
    for name, seconds in times.items():
        print(f'| {name} | {seconds * 1e3:.2f} | {seconds / base:.3f} |')
    extra = times['DIDA step'] - base
    print(f'| DIDA step - static step | {extra * 1e3:.2f} | {extra / base:.3f} |')


if __name__ == '__main__':
    main()
