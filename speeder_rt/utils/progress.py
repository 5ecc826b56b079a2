"""The package's progress bars: tqdm on stderr with elapsed and remaining time, gone when the step ends."""
from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it",
                 enabled: bool = True) -> tqdm:
    """A bar over ``iterable`` (or ``total`` manual updates) that refreshes at most once a second and is
    cleared when closed; ``enabled=False`` shows nothing."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=False, mininterval=1.0,
                dynamic_ncols=True)
