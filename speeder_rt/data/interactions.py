"""The in-memory form every loader returns: (user, item, timestamp) rows over dense ids."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Interactions:
    """Implicit-feedback interactions.

    Row ``r`` says user ``users[r]`` interacted with item ``items[r]`` at ``timestamps[r]``. Users and items
    are dense ids: ``user_keys[u]`` / ``item_keys[i]`` are the source's own keys (strings). ``titles[i]`` is
    the item's title ("" when the source has none); ``descriptions[i]`` likewise. ``source`` names the
    file(s) the rows came from, for error messages.
    """

    users: np.ndarray  # int64 [R]
    items: np.ndarray  # int64 [R]
    timestamps: np.ndarray  # int64 [R]
    user_keys: list[str]
    item_keys: list[str]
    titles: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64)
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError(
                f"{self.source}: users/items/timestamps lengths differ ({n}, {len(self.items)}, {len(self.timestamps)})"
            )
        if n == 0:
            raise ValueError(f"{self.source}: no interactions")
        if not self.titles:
            self.titles = [""] * len(self.item_keys)
        if not self.descriptions:
            self.descriptions = [""] * len(self.item_keys)
        if len(self.titles) != len(self.item_keys) or len(self.descriptions) != len(self.item_keys):
            raise ValueError(f"{self.source}: titles/descriptions must have one entry per item key")
        if self.users.min() < 0 or self.users.max() >= len(self.user_keys):
            raise ValueError(f"{self.source}: user id out of range 0..{len(self.user_keys) - 1}")
        if self.items.min() < 0 or self.items.max() >= len(self.item_keys):
            raise ValueError(f"{self.source}: item id out of range 0..{len(self.item_keys) - 1}")

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def num_items(self) -> int:
        return len(self.item_keys)

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_keys(
        cls,
        user_keys: list[str],
        item_keys: list[str],
        timestamps: list[int] | np.ndarray,
        titles: dict[str, str] | None = None,
        descriptions: dict[str, str] | None = None,
        source: str = "<memory>",
    ) -> Interactions:
        """Build from per-row string keys; dense ids follow first appearance; items only in ``titles`` are added."""
        user_index: dict[str, int] = {}
        item_index: dict[str, int] = {}
        users = np.fromiter((user_index.setdefault(u, len(user_index)) for u in user_keys), np.int64, len(user_keys))
        items = np.fromiter((item_index.setdefault(i, len(item_index)) for i in item_keys), np.int64, len(item_keys))
        for key in titles or {}:
            item_index.setdefault(key, len(item_index))
        keys = list(item_index)
        return cls(
            users=users,
            items=items,
            timestamps=np.asarray(timestamps, dtype=np.int64),
            user_keys=list(user_index),
            item_keys=keys,
            titles=[(titles or {}).get(k, "") for k in keys],
            descriptions=[(descriptions or {}).get(k, "") for k in keys],
            source=source,
        )
