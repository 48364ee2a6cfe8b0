"""Is each domain of the offline digits benchmark a real shift? Source-only, leave-one-domain-out.

For every domain as the target, the static Digit-Five CNN (`digitnet`, M3SDA) is trained on the other four
(source-only) and evaluated on the target's test split; the same network trained on the domain itself gives
its in-domain accuracy. A real domain shift shows as target accuracy clearly below in-domain accuracy.

    python bench/bench_source_only_lodo.py                  # ~20 min on 2 CPU cores
    python bench/bench_source_only_lodo.py --model digitnet_compact --epochs 3
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uda_runs import emit_table  # noqa: E402

from dida_timm.data.offline_digits import DOMAINS  # noqa: E402
from dida_timm.training.run import main as train_main  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='digitnet')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=32, help='per source domain')
    parser.add_argument('--lr', type=float, default=0.05, help='leave-one-domain-out runs')
    parser.add_argument('--in-domain-lr', type=float, default=0.01,
                        help='single-domain runs (at 0.05 the network does not train on syn_style / svhn_style alone)')
    parser.add_argument('--markdown', type=Path, default=None, help='also write the table here')
    args = parser.parse_args()
    def run(sources, target, out, batch_size, lr):
        code = train_main(['--model', args.model, '--method', 'source_only', '--source', *sources,
                           '--target', target, '--epochs', str(args.epochs), '--seed', str(args.seed),
                           '--batch-size', str(batch_size), '--lr', str(lr),
                           '--output', out, '--experiment', f"{'+'.join(sources)}-{target}", '--no-progress',
                           '--tsne-per-domain', '0'])
        if code:
            raise SystemExit(code)
        return json.loads((Path(out) / f"{'+'.join(sources)}-{target}" / 'results.json').read_text())

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for i, target in enumerate(DOMAINS):
            sources = [d for d in DOMAINS if d != target]
            lodo = run(sources, target, out, args.batch_size, args.lr)
            # in-domain: trained on the domain alone with as many images per step, evaluated on its own test split
            own = run([target], DOMAINS[(i + 1) % len(DOMAINS)], out, args.batch_size * len(sources),
                      args.in_domain_lr)
            rows.append((target, lodo['target_accuracy'], own['per_domain_accuracy'][target],
                         lodo['wall_seconds'] + own['wall_seconds']))
    lines = [
        f'Source-only `{args.model}`, {args.epochs} epochs, seed {args.seed}, default offline_digits size '
        f'(2,000 train / 500 test per domain; uci_digits 1,297 train). Accuracy (%) on the target\'s test split.',
        '',
        '| target | trained on the other four (source-only) | trained on the target itself (in-domain) | gap '
        '| train time (s) |',
        '|---|---|---|---|---|',
    ]
    lines += [f'| {t} | {a:.1f} | {i:.1f} | {i - a:.1f} | {s:.0f} |' for t, a, i, s in rows]
    mean_t = sum(r[1] for r in rows) / len(rows)
    mean_i = sum(r[2] for r in rows) / len(rows)
    lines.append(f'| mean | {mean_t:.1f} | {mean_i:.1f} | {mean_i - mean_t:.1f} | |')
    emit_table(lines, args.markdown)


if __name__ == '__main__':
    main()
