"""New items reach a running server without a restart (issue 24): ``python -m speeder_rt.serve`` on a tiny ONNX export
keeps answering clients while ``add_export_items`` writes a new item-table version; the Triton model switches to it
between batches, no request fails, and the new ids are answered (scored like the items whose tokens they carry).
Where faiss is installed the export has an ANN index (``--index flat``): ``speeder_topk`` answers through it, and the
add extends it in the new version.

Runs in the serve venv (.venv-serve), like tests/test_serve.py, whose server harness it uses: free loopback ports,
bounded waits, the server stopped by PID in teardown."""
import importlib.util
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving runs in the serve venv (.venv-serve, built by make test)")
httpclient = pytest.importorskip("tritonclient.http")
from test_serve import Server, inputs, padded  # noqa: E402
from tiny_model import tiny_speeder  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from speeder_rt.export.add_items import add_export_items  # noqa: E402
from speeder_rt.export.exporter import export_model  # noqa: E402
from speeder_rt.export.format import Ranges  # noqa: E402
from speeder_rt.export.items import read_item_tokens  # noqa: E402
from speeder_rt.runtime import Recommender  # noqa: E402

N_ITEMS, RANGES, TOPK = 120, Ranges(max_batch=8, max_history=8, max_candidates=10), 5
INDEX = "flat" if importlib.util.find_spec("faiss") else "exact"  # the serve venv has faiss (make serve-venv)
COPIED = [9, 44, 3]  # the new items 120, 121, 122 carry these items' tokens
VISIBLE_WITHIN_S = 30  # bounded wait for the switch (the model polls every second; this machine is shared)


def score(client, history, candidates):
    ids, mask = padded([history])
    return client.infer("speeder", inputs(httpclient, ids, mask, np.array([candidates], np.int64))).as_numpy("scores")[0]


def test_a_new_item_version_is_served_while_clients_query_with_no_failed_request(tmp_path_factory):
    export = tmp_path_factory.mktemp("serve_items") / "onnx"
    export_model(tiny_speeder(N_ITEMS), "onnx", export, ranges=RANGES, topk=TOPK, index=INDEX, log=lambda *_: None)
    srv = Server(["-m", "speeder_rt.serve", "--export", str(export)], tmp_path_factory.mktemp("serve_items_cli"))
    try:
        srv.wait_ready()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        with pytest.raises(InferenceServerException, match="120"):  # not in the catalog yet
            score(client, [3, 17], [N_ITEMS])
        answered, failures, stop = [0], [], threading.Event()

        def keep_querying():
            own = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
            rng = np.random.default_rng(0)
            while not stop.is_set():
                history = rng.integers(0, N_ITEMS, size=int(rng.integers(1, 8))).tolist()
                try:
                    scores = score(own, history, rng.integers(0, N_ITEMS, size=6).tolist())
                    ids, mask = padded([history])
                    top = own.infer("speeder_topk", inputs(httpclient, ids, mask)).as_numpy("item_ids")
                    assert np.isfinite(scores).all() and (top >= 0).all()
                    answered[0] += 1
                except Exception as e:  # noqa: BLE001 -- every failure is counted and reported
                    failures.append(repr(e))

        threads = [threading.Thread(target=keep_querying) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(2)
        added = add_export_items(export, read_item_tokens(export).tokens[COPIED])
        written = time.monotonic()
        deadline = written + VISIBLE_WITHIN_S
        while True:
            try:
                new_scores = score(client, [3, 17], [N_ITEMS, N_ITEMS + 1, N_ITEMS + 2])
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, f"item {N_ITEMS} not served {VISIBLE_WITHIN_S} s after the add"
                time.sleep(0.2)
        visible_s = time.monotonic() - written
        time.sleep(1)  # clients keep querying after the switch (both models switch on their own polls)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not failures, f"{len(failures)} failed requests during the switch, e.g. {failures[:3]}"
        assert answered[0] > 0 and added.version == 2
        np.testing.assert_array_equal(new_scores, score(client, [3, 17], COPIED))
        local = Recommender.load(export)  # version 2, through its extended index where there is one
        assert added.indexed == (INDEX != "exact") and (local.index is not None) == added.indexed
        ids, mask = padded([[9, 3]])
        served = client.infer("speeder_topk", inputs(httpclient, ids, mask)).as_numpy("item_ids")
        np.testing.assert_array_equal(served, local.topk([[9, 3]], k=TOPK)[0])
        print(f"new items visible {visible_s:.2f} s after the add; {answered[0]} request pairs answered, 0 failed")
    finally:
        left = srv.stop()
        assert not left, f"processes left after the server stopped: {left}"
