"""Prepare a run's data: interactions -> sequences and the ItemTable with every requested modality.

The table is cached in ``<out_dir>/items`` (atomically written); a later run or the eval CLI reuses it.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from speeder_rt.data import ItemTable, SequenceData, SyntheticConfig, build_sequences, generate_synthetic
from speeder_rt.data.interactions import Interactions
from speeder_rt.train.config import RunConfig, parse_source


def load_interactions(source: str, synthetic: SyntheticConfig | None = None
                      ) -> tuple[Interactions, ItemTable | None]:
    """(interactions, a table with generated features for synthetic data or None) of a ``data.source``."""
    kind, arg = parse_source(source)
    if kind == "synthetic":
        return generate_synthetic(synthetic)
    from speeder_rt.data import loaders

    if kind == "movielens":
        if not arg:
            from speeder_rt.data.assets import movielens_100k

            arg = str(movielens_100k())
        return loaders.load_movielens(arg), None
    if kind == "csv":
        return loaders.load_csv(arg), None
    reviews, _, meta = arg.partition(",")
    return loaders.load_amazon_reviews(reviews, meta or None), None


def prepare(cfg: RunConfig, log=print) -> tuple[SequenceData, ItemTable]:
    """Sequences and the ItemTable with every modality the model asks for."""
    inter, table, data = load_sequences(cfg)
    return data, item_table(cfg, inter, data, table, log=log)


def load_sequences(cfg: RunConfig) -> tuple[Interactions, ItemTable | None, SequenceData]:
    """(interactions, the synthetic source's table or None, sequences split by the run's protocol)."""
    inter, table = load_interactions(cfg.data.source, cfg.data.synthetic)
    return inter, table, build_sequences(inter, cfg.data.split)


def item_cache(cfg: RunConfig) -> Path:
    """Where a run caches its ItemTable."""
    return Path(cfg.out_dir) / "items"


def item_table(cfg: RunConfig, inter: Interactions, data: SequenceData, table: ItemTable | None = None,
               sasrec=None, log=print) -> ItemTable:
    """The run's ItemTable (cached in ``item_cache(cfg)``); ``sasrec``: a trained SASRec for collab features."""
    cache = item_cache(cfg)
    recipe = {"data": dataclasses.asdict(cfg.data), "seed": cfg.seed}
    if (cache / "items.json").is_file():
        cached = ItemTable.load(cache)
        if cached.meta.get("recipe") == recipe and set(cfg.model.modalities) <= set(cached.modalities):
            return cached
    if table is None:
        table = ItemTable(inter.item_keys, titles=inter.titles, descriptions=inter.descriptions)
    wants = set(cfg.model.modalities)
    text_source = cfg.data.text_features
    if "text" in wants and (text_source == "minilm" or (text_source == "auto" and "text" not in table.modalities)):
        from speeder_rt.data.features import add_text_features

        start = time.perf_counter()
        add_text_features(table, progress=cfg.train.progress)
        log(f"text features: MiniLM over {len(table)} items ({time.perf_counter() - start:.1f}s)")
    if "image" in wants and cfg.data.image_features:
        from speeder_rt.data.features import load_image_features

        load_image_features(table, cfg.data.image_features)
    if "collab" in wants and cfg.data.collab_features:
        from speeder_rt.baselines.sasrec import add_collab_features, train_sasrec

        if sasrec is None:
            sasrec = train_sasrec(data, cfg.data.sasrec, log=log, progress=cfg.train.progress)
        add_collab_features(table, sasrec)
        log(f"collab features: SASRec item embeddings ({table.width('collab')}-d)")
    missing = [m for m in cfg.model.modalities if m not in table.modalities]
    if missing:
        raise ValueError(f"model.modalities {missing} have no features: configure data.text_features / "
                         f"data.image_features / data.collab_features, or drop them from model.modalities")
    table.meta["recipe"] = recipe
    table.save(cache)
    return table
