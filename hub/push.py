#!/usr/bin/env python3
"""Upload an exported repo folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`).

    python hub/push.py hub/checkpoints/NAME --repo-id ORG/NAME --dry-run    # list what would be uploaded
    HF_TOKEN=... python hub/push.py hub/checkpoints/NAME --repo-id ORG/NAME
"""
import argparse
import sys
from pathlib import Path

from dida_timm.arguments import check_options, hub_repo_id
from dida_timm.hub import push_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', type=Path)
    parser.add_argument('--repo-id', required=True)
    parser.add_argument('--private', action='store_true')
    parser.add_argument('--dry-run', action='store_true', help='list the files, upload nothing')
    args = parser.parse_args(argv)
    check_options(parser, args, [('repo_id', hub_repo_id)])
    try:
        files = push_folder(args.folder, args.repo_id, args.private, args.dry_run)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    verb = 'would upload' if args.dry_run else 'uploaded'
    for name in files:
        print(f'{verb} {name} ({(args.folder / name).stat().st_size:,} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
