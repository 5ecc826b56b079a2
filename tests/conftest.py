import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--fuzz-count", type=int, default=2000,
                     help="requests per runtime in tests/test_fuzz_runtimes.py (default 2000, under a minute on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def contract_exports(tmp_path_factory):
    """ONNX and AOTInductor exports of bad_requests.contract_model() (``root/onnx``, ``root/aoti``), built once."""
    from bad_requests import export_contract_model

    return export_contract_model(tmp_path_factory.mktemp("contract"))
