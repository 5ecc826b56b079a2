"""python -m speeder_rt.catalog add ...: new items for a trained model directory or for an export, without retraining.

    add --model DIR --items NEW.jsonl [--out DIR2]     a model directory's item table (``speeder_rt.catalog.add``)
    add --export DIR --model DIR --items NEW.jsonl     an export's item table, the new items' tokens from the model's
                                                       MoME (the model the export was made from)
    add --export DIR --tokens NEW.npy                  an export's item table, tokens given ([M, D] .npy, no pickle)

An export gets a new version of ``items/`` (``speeder_rt.export.add_items``): nothing is re-exported, a running
server picks it up between requests. Exit status: 0 added; 2 bad input (named: file, line, field or row), nothing
written.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from speeder_rt.export.add_items import add_export_items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.catalog",
                                     description="Add items to a trained model directory or an export.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="append new items (ids N, N+1, ...; existing ids never change)")
    add.add_argument("--model", help="the trained model directory (e.g. runs/NAME/speeder/best)")
    add.add_argument("--items", help="JSON Lines: {item, title, description} and/or {item, features: {modality: "
                                     "[numbers]}} per line")
    add.add_argument("--out", help="--model alone: write a new model directory here (default: in place)")
    add.add_argument("--export", help="an export directory (python -m speeder_rt.export): a new item-table version")
    add.add_argument("--tokens", help="with --export: the new items' tokens, a float .npy [M, D]")
    return parser


def _export_tokens(args: argparse.Namespace) -> np.ndarray:
    """The new items' tokens for ``--export``: ``--tokens`` read, or ``--items`` through ``--model``'s MoME."""
    if args.tokens is not None:
        if args.items is not None or args.model is not None:
            raise ValueError("--tokens gives the tokens: leave out --model / --items")
        try:
            return np.load(args.tokens, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{args.tokens}: not a readable .npy array ({e})") from None
    if args.items is None or args.model is None:
        raise ValueError("--export needs --tokens, or --model and --items")
    from speeder_rt.catalog.add import item_tokens_for, read_jsonl  # the model's MoME: only for this path

    return item_tokens_for(args.model, [record for _, record in read_jsonl(args.items)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.export is None:
        if args.tokens is not None:
            print("error: --tokens needs --export", file=sys.stderr)
            return 2
        if args.model is None or args.items is None:
            print("error: add needs --model and --items (or --export)", file=sys.stderr)
            return 2
        from speeder_rt.catalog import add

        return add.main(args)
    if args.out is not None:
        print("error: --out is for a model directory; --export adds in place (a new version)", file=sys.stderr)
        return 2
    try:
        added = add_export_items(args.export, _export_tokens(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added {added.count} items (ids {added.first_id}..{added.first_id + added.count - 1}) to {added.export_dir} "
          f"(item table version {added.version}{', ANN index extended' if added.indexed else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
