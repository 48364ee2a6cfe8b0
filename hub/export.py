#!/usr/bin/env python3
"""Turn finished training runs into a Hugging Face model repo folder (config.json, model.safetensors, card).

    python hub/export.py output/RUN --out hub/checkpoints/NAME --repo-name ORG/NAME
    python hub/export.py output/RUN_SEED0 output/RUN_SEED1 output/RUN_SEED2 --out ... --repo-name ...

Several runs must be seeds of one setting: the first run's weights are exported and the card reports
mean +- std over all of them.
"""
import argparse
import sys
from pathlib import Path

import dida_timm  # noqa: F401  registers the models
from dida_timm.arguments import check_options, distinct, hub_repo_id
from dida_timm.hub import export_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', type=Path, help='training output folders (holding results.json)')
    parser.add_argument('--out', type=Path, required=True, help='repo folder to write')
    parser.add_argument('--repo-name', required=True, help='ORG/NAME used in the card')
    parser.add_argument('--license', default=None,
                        help='license of the export (default: that of the pretrained weights the first run started '
                             'from, else apache-2.0)')
    parser.add_argument('--tag', default=None,
                        help='pretrained tag in config.json (default: TAG of an --out folder named ARCH.TAG, '
                             'else DATASET_TARGET lower-cased, other characters as underscores)')
    args = parser.parse_args(argv)
    check_options(parser, args, [('runs', distinct), ('repo_name', hub_repo_id)])
    if args.out.exists() and not args.out.is_dir():
        parser.error(f'--out: {args.out} is a file; give the repo folder to write')
    try:
        out = export_runs(args.runs, args.out, args.repo_name, args.license, tag=args.tag)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'exported to {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == '__main__':
    sys.exit(main())
