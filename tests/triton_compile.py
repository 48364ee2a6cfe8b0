"""Compile the DIDA unit's Triton kernels for a GPU architecture with Triton's own compiler, without a GPU.

The interpreter (how the other tests run the kernels on a CPU) checks what the kernels compute, not that Triton's
GPU compiler accepts them: a kernel can pass every interpreted test and still fail, or crash LLVM, when it is
compiled for a real card. This script records the launches `dida_triton` makes for a set of unit shapes (the real
launch code, with a recorder in place of each kernel) and compiles each launch as Triton's JIT would specialise it
(argument dtypes, 16-byte alignment, integers divisible by 16 or equal to 1) for the architectures asked, and
reads ptxas's report of each: registers a thread and bytes spilled to local memory (a spill is slow on any card).

Run as a script, Triton's interpreter off (a compiler crash ends the process, not the caller):

    python tests/triton_compile.py --arch 90 80

Prints a line per launch before compiling it, so a crash names its configuration. Needs Triton >= 3.6, whose
argument specialisation (`native_specialize_impl`, internal) it calls.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from typing import List, Sequence, Tuple

os.environ.pop('TRITON_INTERPRET', None)
# a fresh cache: a cached kernel skips ptxas, and its report with it
os.environ.setdefault('TRITON_CACHE_DIR', tempfile.mkdtemp(prefix='dida-triton-compile-'))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from dida_timm.layers import _dida_kernels, dida_triton  # noqa: E402

KERNELS = ('dynamic_paths_forward', 'dynamic_paths_backward', 'generator_grads')

# (kernel sizes, dilations, stride, height, width, reduced channels): the paper's unit (3x3 kernels, dilations 1
# and 2) at both strides and every block size the launcher picks (maps of 9, 64 and 784 positions), then one or
# two paths of other kernel sizes, which change the kernels' tap tiles, and a 1 x 1 map of one channel
UNITS = (
    ((3, 3), (1, 2), 1, 3, 3, 4),
    ((3, 3), (1, 2), 2, 8, 8, 8),
    ((3, 3), (1, 2), 1, 28, 28, 16),
    ((3, 3), (1, 2), 2, 28, 28, 32),
    ((3,), (1,), 1, 7, 9, 4),
    ((1, 3), (1, 2), 2, 14, 14, 8),
    ((3, 5), (1, 2), 1, 14, 14, 16),
    ((5, 5), (2, 4), 2, 14, 14, 4),
    ((7,), (1,), 1, 14, 14, 1),
    ((7, 7), (1, 2), 1, 9, 10, 8),
    ((3, 3), (1, 2), 1, 1, 1, 1),  # every integer argument 1, which Triton compiles as a constant
)


_REPORTS = {}  # (source hash, arch, warps) -> (registers, bytes spilled)


class _Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, num_warps=..., **constexprs)` records the call,
    its warps (Triton's default 4 where the launch names none) apart from its constexprs."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, num_warps=4, **constexprs: self.calls.append((self.name, args, constexprs, num_warps))


def record_launches(kernel_sizes: Sequence[int], dilations: Sequence[int], stride: int, height: int, width: int,
                    channels: int, dtype: torch.dtype) -> list:
    """The kernel launches of one forward and backward of a unit, as `dida_triton` makes them."""
    calls = []
    originals = {name: getattr(_dida_kernels, name) for name in KERNELS}
    interpret = dida_triton._INTERPRET
    try:
        for name in KERNELS:
            setattr(_dida_kernels, name, _Recorder(name, calls))
        dida_triton._INTERPRET = True  # lets the launchers take CPU tensors; nothing runs
        generators = []
        for k in kernel_sizes:
            generators += [torch.zeros(k * k, 1, 1, 1), torch.zeros(k * k), torch.zeros(1, 1, 1, 1), torch.zeros(1)]
        pre = torch.zeros(2, channels, height * width, dtype=dtype)
        out, code = dida_triton._launch_forward(pre, generators, height, width, stride, list(dilations))
        dida_triton._launch_backward(torch.zeros_like(out), pre, code, generators, height, width, stride,
                                     list(dilations))
    finally:
        for name, kernel in originals.items():
            setattr(_dida_kernels, name, kernel)
        dida_triton._INTERPRET = interpret
    return calls


def compile_launch(name: str, args: tuple, constexprs: dict, warps: int, arch: int) -> Tuple[int, int]:
    """Compile one recorded launch for `arch`, each argument specialised by Triton's own rule.

    Returns:
        Registers a thread and bytes of spill stores, from the report of Triton's own ptxas run.
    """
    kernel = getattr(_dida_kernels, name)
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    names = [n for n in kernel.arg_names if n not in constexprs]
    if len(names) != len(args):
        raise ValueError(f'{name}: {len(args)} arguments recorded for {len(names)} parameters')
    signature, constants, attrs = {}, dict(constexprs), {}
    for arg_name, arg in zip(names, args):
        kind, spec = native_specialize_impl(type(backend), arg, False, True, True)
        if kind == 'constexpr':
            constants[arg_name] = spec
        else:
            attrs[(kernel.arg_names.index(arg_name),)] = backend.parse_attr(spec)
        signature[arg_name] = kind
    signature = {n: signature.get(n, 'constexpr') for n in kernel.arg_names}
    source = ASTSource(kernel, signature, constants, attrs)
    key = source.hash(), arch, warps
    if key in _REPORTS:  # the same specialisation as an earlier launch: Triton would not compile it again
        return _REPORTS[key]
    report = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v report
    with contextlib.redirect_stdout(report):
        triton.compile(source, target=target, options={'num_warps': warps})
    registers = re.search(r'Used (\d+) registers', report.getvalue())
    spills = re.search(r'(\d+) bytes spill stores', report.getvalue())
    if registers is None or spills is None:
        raise RuntimeError(f'{name}: no ptxas report (a cached kernel?):\n{report.getvalue()}')
    _REPORTS[key] = int(registers.group(1)), int(spills.group(1))
    return _REPORTS[key]


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[90], help='compute capabilities, e.g. 90 80')
    parser.add_argument('--dtype', nargs='+', default=['float32', 'bfloat16'], choices=['float32', 'bfloat16',
                                                                                         'float16'])
    args = parser.parse_args(argv)
    compiled, spilled = 0, []
    for arch in args.arch:
        for dtype in args.dtype:
            for kernel_sizes, dilations, stride, height, width, channels in UNITS:
                calls = record_launches(kernel_sizes, dilations, stride, height, width, channels,
                                        getattr(torch, dtype))
                for name, launch_args, constexprs, warps in calls:
                    launch = (f'sm_{arch} {dtype} kernel sizes {kernel_sizes} dilations {dilations} stride {stride} '
                              f'map {height}x{width} r {channels}: {name}, {warps} warps')
                    print(launch, end='', flush=True)
                    registers, spill = compile_launch(name, launch_args, constexprs, warps, arch)
                    print(f': {registers} registers, {spill} bytes spilled', flush=True)
                    compiled += 1
                    if spill:
                        spilled.append(launch)
    most = max(registers for registers, _ in _REPORTS.values())
    print(f'compiled {compiled} launches ({len(_REPORTS)} distinct); register spills: {len(spilled) or "none"}; '
          f'most registers a thread: {most}', flush=True)
    return 0

if __name__ == '__main__':
    sys.exit(main())
