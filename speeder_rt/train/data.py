"""Prepare a run's data: interactions -> sequences and the ItemTable with every requested modality.

The split is built from ``data.source``, or read from ``data.prepared`` (written once by ``python -m
speeder_rt.data prepare``; memory-mapped, so torchrun ranks share its pages). The table is cached in
``<out_dir>/items`` (atomically written); a later run or the eval CLI reuses it.
"""
from __future__ import annotations

import time
from pathlib import Path

from speeder_rt.data import ItemTable, SequenceData, build_sequences, generate_synthetic
from speeder_rt.data.prepared import load_split, split_recipe
from speeder_rt.data.sources import load_source
from speeder_rt.train.config import RunConfig


def prepare(cfg: RunConfig, log=print) -> tuple[SequenceData, ItemTable]:
    """Sequences and the ItemTable with every modality the model asks for."""
    table, data = load_sequences(cfg)
    return data, item_table(cfg, data, table, log=log)


def load_sequences(cfg: RunConfig) -> tuple[ItemTable | None, SequenceData]:
    """(the synthetic source's table or None, sequences split by the run's protocol): read from ``data.prepared``
    when it is set (refused if prepared from another recipe), else built from the source."""
    if cfg.data.prepared:
        table = generate_synthetic(cfg.data.synthetic)[1] if cfg.data.source == "synthetic" else None
        where = cfg.data.prepared.replace("{seed}", str(cfg.data.split.seed))
        return table, load_split(where, split_recipe(cfg.data.source, cfg.data.split, cfg.data.synthetic))
    inter, table = load_source(cfg.data.source, cfg.data.synthetic, progress=cfg.train.progress)
    return table, build_sequences(inter, cfg.data.split)


def item_cache(cfg: RunConfig) -> Path:
    """Where a run caches its ItemTable."""
    return Path(cfg.out_dir) / "items"


def item_table(cfg: RunConfig, data: SequenceData, table: ItemTable | None = None, sasrec=None, log=print
               ) -> ItemTable:
    """The run's ItemTable (cached in ``item_cache(cfg)``); ``sasrec``: a trained SASRec for collab features."""
    cache = item_cache(cfg)
    recipe = {"data": cfg.data.identity(), "seed": cfg.seed}
    if (cache / "items.json").is_file():
        cached = ItemTable.load(cache)
        if cached.meta.get("recipe") == recipe and set(cfg.model.modalities) <= set(cached.modalities):
            return cached
    if table is None:
        table = ItemTable(data.item_keys, titles=data.titles, descriptions=data.descriptions)
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
