"""Data: item tables, interaction loaders, the synthetic default data and the evaluation protocol."""
from speeder_rt.data.interactions import Interactions
from speeder_rt.data.item_table import ItemTable
from speeder_rt.data.loaders import DataFormatError, load_amazon_reviews, load_csv, load_movielens, load_parquet
from speeder_rt.data.sequences import PAD, Samples, SequenceData, SplitConfig, build_sequences
from speeder_rt.data.synthetic import SyntheticConfig, generate_synthetic

__all__ = [
    "PAD",
    "DataFormatError",
    "load_amazon_reviews",
    "load_csv",
    "load_movielens",
    "load_parquet",
    "Interactions",
    "ItemTable",
    "Samples",
    "SequenceData",
    "SplitConfig",
    "SyntheticConfig",
    "build_sequences",
    "generate_synthetic",
]
