"""The columnar split equals the row-by-row one it replaced: MovieLens-100K and the demo data, seeds 0-2, the
study's history-50 variant, and the training candidates the trainer draws (frozen in tests/data/)."""
import json

import pytest
from split_digest import FIXTURE, cases, digest

from speeder_rt.train.data import load_sequences

FROZEN = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name, cfg", cases(), ids=[name for name, _ in cases()])
def test_split_equals_the_frozen_digest(name, cfg):
    assert digest(load_sequences(cfg)[1]) == FROZEN[name]
