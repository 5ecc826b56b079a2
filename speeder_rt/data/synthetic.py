"""The embedded default data: a synthetic catalog whose next items are predictable from every modality.

Generative story (all draws from one ``numpy.random.Generator(seed)``):

- Items. ``n_clusters`` centres ``c_k ~ N(0, I_latent)``; item ``i`` of cluster ``k`` has latent
  ``z_i = c_k + sigma_item * eps``. Popularity ``pop_i`` is Zipf-like (``rank^-zipf_a``, ranks shuffled).
- Modalities are differently distorted noisy views of ``z``, so each carries signal the others lack:
  text sees the first ``2/3`` of the latent dims through ``tanh(A_t z)``, image sees the last ``2/3``
  through ``(A_v z)^2``-style distortion; both with their own noise. Images are missing for a fraction
  of items. Titles are short word sequences drawn from the cluster's vocabulary.
- Users. Each user starts in a cluster drawn from a preference, then steps: stay in the cluster with
  probability ``p_stay`` or move along the cluster transition matrix (each cluster has two likely
  successors). Within the cluster the next item is drawn with probability
  ``∝ pop_i * exp(-|z_i - z_prev|^2 / tau)``, never repeating an item the user already has.
  Timestamps increase by random gaps, with occasional ties (gap 0) so stable tie-breaking matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from speeder_rt.data.interactions import Interactions
from speeder_rt.data.item_table import ItemTable
from speeder_rt.utils.schema import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    check,
    invalid,
)

_WORDS = (
    "amber iron velvet silent crimson hollow golden shadow river ember frost lunar solar coral "
    "atlas echo harbor maple quartz raven sable tidal violet willow zephyr cobalt delta fable "
    "garnet haven indigo jade kestrel lumen marble nova onyx prism quill rune sierra topaz"
).split()


@dataclass(frozen=True)
class SyntheticConfig:
    n_items: PositiveInt = 600
    n_users: PositiveInt = 1200
    n_clusters: Annotated[int, Range(ge=2)] = 12
    latent_dim: PositiveInt = 16
    text_dim: PositiveInt = 64
    image_dim: PositiveInt = 48
    min_seq_len: Annotated[int, Range(ge=3)] = 8
    max_seq_len: Annotated[int, Range(ge=3)] = 30
    p_stay: Fraction = 0.75
    tau: PositiveFloat = 4.0
    zipf_a: NonNegativeFloat = 0.8
    sigma_item: NonNegativeFloat = 0.6
    text_noise: NonNegativeFloat = 0.15
    image_noise: NonNegativeFloat = 0.3
    image_missing: Fraction = 0.15
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        check(self)
        if self.min_seq_len > self.max_seq_len:
            raise invalid(self, "min_seq_len", f"{self.min_seq_len} exceeds max_seq_len ({self.max_seq_len})")
        if self.n_items < max(40, 2 * self.max_seq_len):
            raise invalid(self, "n_items", f"{self.n_items} is too small: 20 candidates and max_seq_len "
                                           f"{self.max_seq_len} need at least {max(40, 2 * self.max_seq_len)}")


def generate_synthetic(cfg: SyntheticConfig | None = None) -> tuple[Interactions, ItemTable]:
    """Deterministic by ``cfg.seed``: the same config gives bit-identical interactions and features."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    n, k_clusters, d = cfg.n_items, cfg.n_clusters, cfg.latent_dim

    centres = rng.normal(size=(k_clusters, d)) * 2.0
    cluster = rng.integers(0, k_clusters, size=n)
    latent = centres[cluster] + cfg.sigma_item * rng.normal(size=(n, d))
    popularity = (1.0 + rng.permutation(n)) ** (-cfg.zipf_a)

    third = d // 3
    text_in = latent[:, : d - third]
    image_in = latent[:, third:]
    a_text = rng.normal(size=(text_in.shape[1], cfg.text_dim)) / np.sqrt(text_in.shape[1])
    a_image = rng.normal(size=(image_in.shape[1], cfg.image_dim)) / np.sqrt(image_in.shape[1])
    text = np.tanh(text_in @ a_text) + cfg.text_noise * rng.normal(size=(n, cfg.text_dim))
    proj = image_in @ a_image
    image = np.sign(proj) * np.sqrt(np.abs(proj)) + cfg.image_noise * rng.normal(size=(n, cfg.image_dim))
    image_available = rng.random(n) >= cfg.image_missing

    vocab = rng.permuted(np.resize(np.arange(len(_WORDS)), (k_clusters, 6)), axis=1)
    titles = [
        " ".join(_WORDS[w] for w in rng.choice(vocab[cluster[i]], size=2, replace=False)) + f" {i}"
        for i in range(n)
    ]

    # Two likely successor clusters per cluster.
    transition = np.full((k_clusters, k_clusters), 0.2 / k_clusters)
    for c in range(k_clusters):
        for succ in rng.choice([x for x in range(k_clusters) if x != c], size=2, replace=False):
            transition[c, succ] += 0.4
    transition /= transition.sum(axis=1, keepdims=True)
    members = [np.flatnonzero(cluster == c) for c in range(k_clusters)]
    cluster_pref = rng.dirichlet(np.ones(k_clusters))

    users, items, stamps = [], [], []
    for u in range(cfg.n_users):
        length = int(rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1))
        seen: set[int] = set()
        c = int(rng.choice(k_clusters, p=cluster_pref))
        prev = None
        t = int(rng.integers(1_000_000, 2_000_000))
        for _ in range(length):
            if prev is not None and rng.random() >= cfg.p_stay:
                c = int(rng.choice(k_clusters, p=transition[c]))
            cand = np.array([i for i in members[c] if i not in seen]) if members[c].size else np.array([], dtype=int)
            if cand.size == 0:
                cand = np.array([i for i in range(n) if i not in seen])
            weight = popularity[cand].copy()
            if prev is not None:
                weight *= np.exp(-((latent[cand] - latent[prev]) ** 2).sum(1) / cfg.tau)
            weight = weight / weight.sum() if weight.sum() > 0 else np.full(cand.size, 1.0 / cand.size)
            item = int(rng.choice(cand, p=weight))
            seen.add(item)
            users.append(u)
            items.append(item)
            stamps.append(t)
            t += int(rng.integers(0, 5)) * 60
            prev = item

    item_keys = [f"item{i}" for i in range(n)]
    inter = Interactions(
        users=np.array(users),
        items=np.array(items),
        timestamps=np.array(stamps),
        user_keys=[f"user{u}" for u in range(cfg.n_users)],
        item_keys=item_keys,
        titles=titles,
        source=f"synthetic(seed={cfg.seed})",
    )
    table = ItemTable(item_keys, titles=titles)
    table.set_modality("text", text.astype(np.float32))
    table.set_modality("image", image.astype(np.float32), available=image_available)
    table.meta["synthetic_seed"] = cfg.seed
    return inter, table
