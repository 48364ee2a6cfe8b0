"""How instance-dependent are a trained DIDA branch's kernels, and how much does the branch add?

Reads finished runs of train/train.py (their `args.yaml`, `model.safetensors` and `results.json`), runs each
model over the offline digits test images of every domain, and prints per run:

- kernel spread: how far the generated kernels of one channel move from that channel's mean kernel, relative to
  the mean kernel's size (RMS over images of ||K_n - mean K|| / ||mean K||, averaged over channels and dilation
  paths), within the target domain and over all five domains. 0 would mean a static branch in disguise.
- domain share of the codes: the fraction of the variance of the kernel codes g that lies between domains
  (eta squared, averaged over channels): near 1 the kernels encode the domain, near 0 the single image.
- branch / block: RMS of the branch output over RMS of the static block it is added to, on the target images.

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028 (its premise is that kernels
adapt to each instance, with no domain label).

    python bench/bench_dida_kernels.py                                   # the study's mnistm_style DIDA-Net runs
    python bench/bench_dida_kernels.py output/uda_accuracy/mnistm_style-DIDA-Net-s0 --markdown kernels.md
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import timm
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import emit_table  # noqa: E402

import dida_timm  # noqa: E402,F401  registers the models
from dida_timm.data import create_domain_datasets, create_uda_transforms  # noqa: E402
from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.layers import DidaModule, DidaStage  # noqa: E402


def load_run(run: Path) -> tuple:
    """(model in eval mode with the run's final weights, the run's arguments, its results)."""
    args = yaml.safe_load((run / 'args.yaml').read_text())
    model = timm.create_model(args['model'], **args['model_kwargs'])
    model.load_state_dict(load_file(run / 'model.safetensors'))
    return model.eval(), args, json.loads((run / 'results.json').read_text())


@torch.no_grad()
def branch_statistics(model: torch.nn.Module, args: dict, batch_size: int = 250) -> Dict[str, object]:
    """Kernel codes and branch / block RMS of the first DIDA stage, over each domain's test images."""
    stage = next(m for m in model.modules() if isinstance(m, DidaStage))
    module = next(m for m in stage.branch.modules() if isinstance(m, DidaModule))
    captured: Dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0])),
        stage.blocks.register_forward_hook(lambda m, inp, out: captured.update(blocks=out)),
        stage.branch.register_forward_hook(lambda m, inp, out: captured.update(branch=out)),
    ]
    cfg = timm.data.resolve_data_config({}, model=model)
    test_tf = create_uda_transforms(cfg['input_size'][-1], cfg['mean'], cfg['std'])['test']
    datasets = create_domain_datasets('offline_digits', args['data_dir'], DOMAINS, args['target_test_split'],
                                      test_tf, train_size=args['offline_train_size'],
                                      test_size=args['offline_test_size'])
    codes: Dict[str, List[torch.Tensor]] = {}
    sq = {'blocks': 0.0, 'branch': 0.0}
    for ds in datasets:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
        codes[ds.domain] = []
        for images, _ in loader:
            model(images)
            if module.dynamic:
                codes[ds.domain].append(torch.stack(module.kernel_codes(captured['x']), 1))  # [N, paths, r]
            if ds.domain == args['target']:
                for key in sq:
                    sq[key] += captured[key].square().sum().item()
    for h in hooks:
        h.remove()
    stats: Dict[str, object] = {'branch_to_block': (sq['branch'] / sq['blocks']) ** 0.5}
    if module.dynamic:
        stats['codes'] = {d: torch.cat(c) for d, c in codes.items()}
        stats['bases'] = module.kernel_bases()
    return stats


def kernel_spread(codes: torch.Tensor, bases: list) -> float:
    """RMS over images of ||K_n - mean K|| / ||mean K||, averaged over channels and paths; codes [N, paths, r]."""
    spreads = []
    for p, (u, v) in enumerate(bases):
        g = codes[:, p]  # [N, r]; K = g * u + v, so K_n - mean K = (g_n - mean g) * u
        mean_kernel = g.mean(0)[:, None, None] * u + v  # [r, k, k]
        spreads.append(g.std(0, unbiased=False) * u.norm() / mean_kernel.flatten(1).norm(dim=1))
    return torch.cat(spreads).mean().item()


def domain_share(codes: Dict[str, torch.Tensor]) -> float:
    """Between-domain share of the code variance (eta squared), averaged over channels that vary at all."""
    pooled = torch.cat(list(codes.values())).flatten(1)  # [N, paths * r]
    total = (pooled - pooled.mean(0)).square().sum(0)
    between = sum(len(c) * (c.flatten(1).mean(0) - pooled.mean(0)).square() for c in codes.values())
    varies = total > 1e-12
    return (between[varies] / total[varies]).mean().item() if varies.any() else float('nan')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', type=Path, nargs='*', help='run folders (default: the study\'s mnistm_style runs '
                        'of DIDA-Net and the static branch, seeds 0-2)')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the table here')
    args = parser.parse_args()
    study = Path('output/uda_accuracy')
    runs = args.runs or [study / f'mnistm_style-{m}-s{s}' for m in ('DIDA-Net', 'FixMatch_staticbranch')
                         for s in (0, 1, 2)]
    missing = [str(r) for r in runs if not (r / 'model.safetensors').is_file()]
    if missing:
        raise SystemExit(f'error: no finished run (model.safetensors) in {", ".join(missing)}')
    loaded = [(run, *load_run(run)) for run in runs]
    without = [str(run) for run, model, _, _ in loaded if not any(isinstance(m, DidaStage) for m in model.modules())]
    if without:  # FixMatch and source-only runs of a study have no branch to read
        raise SystemExit(f'error: no DIDA branch in the model of {", ".join(without)}')
    sizes = sorted({run_args['offline_test_size'] for _, _, run_args, _ in loaded})

    lines = [
        f'Trained DIDA branches on the offline digits test images ({" / ".join(map(str, sizes))} per domain): '
        'kernel spread = RMS distance of '
        'a channel\'s per-image kernels from its mean kernel, relative to the mean kernel (within the target / '
        'over all five domains); domain share = fraction of the kernel codes\' variance between domains; '
        'branch / block = RMS of the branch output over that of the static block beside it (target images).',
        '',
        '| run | target accuracy | kernel spread (target) | kernel spread (all domains) | domain share of codes '
        '| branch / block |',
        '|---|---|---|---|---|---|',
    ]
    for run, model, run_args, results in loaded:
        stats = branch_statistics(model, run_args)
        cells = ['-', '-', '-']
        if 'codes' in stats:
            codes = stats['codes']
            cells = [f"{kernel_spread(codes[run_args['target']], stats['bases']):.3f}",
                     f"{kernel_spread(torch.cat(list(codes.values())), stats['bases']):.3f}",
                     f'{domain_share(codes):.2f}']
        lines.append(f"| {run.name} | {results['target_accuracy']:.1f} | {' | '.join(cells)} "
                     f"| {stats['branch_to_block']:.2f} |")
        print(lines[-1], flush=True)
    emit_table(lines, args.markdown)


if __name__ == '__main__':
    main()
