"""``data.source`` strings: what they name, the files they read, and loading them."""
from __future__ import annotations

from pathlib import Path

from speeder_rt.data.interactions import Interactions
from speeder_rt.data.item_table import ItemTable
from speeder_rt.data.synthetic import SyntheticConfig, generate_synthetic

SOURCES = "synthetic, movielens[:DIR], csv:FILE, parquet:FILE, amazon:REVIEWS[,META]"


def parse_source(source: str) -> tuple[str, str]:
    """``data.source`` -> (kind, argument): ``csv:x.csv`` -> ``("csv", "x.csv")``."""
    kind, _, arg = source.partition(":")
    if (kind == "synthetic" and not arg) or kind == "movielens" or (kind in ("csv", "parquet", "amazon") and arg):
        return kind, arg
    raise ValueError(f"{source!r} is not one of {SOURCES}")


def source_files(source: str) -> list[Path]:
    """The files ``source`` reads (none for synthetic data); MovieLens without a directory is fetched first."""
    kind, arg = parse_source(source)
    if kind == "synthetic":
        return []
    if kind == "movielens":
        root = Path(arg) if arg else _movielens_default()
        return sorted(p for p in root.iterdir() if p.name in ("u.data", "u.item") or p.suffix in (".inter", ".item"))
    return [Path(p) for p in arg.split(",") if p]


def load_source(source: str, synthetic: SyntheticConfig | None = None, progress: bool = False
                ) -> tuple[Interactions, ItemTable | None]:
    """(interactions, a table with generated features for synthetic data or None) of a ``data.source``;
    ``progress``: a bar per file read."""
    kind, arg = parse_source(source)
    if kind == "synthetic":
        return generate_synthetic(synthetic)
    from speeder_rt.data import loaders

    if kind == "movielens":
        return loaders.load_movielens(arg or _movielens_default(), progress=progress), None
    if kind == "csv":
        return loaders.load_csv(arg, progress=progress), None
    if kind == "parquet":
        return loaders.load_parquet(arg), None
    reviews, _, meta = arg.partition(",")
    return loaders.load_amazon_reviews(reviews, meta or None, progress=progress), None


def _movielens_default() -> Path:
    from speeder_rt.data.assets import movielens_100k

    return movielens_100k()
