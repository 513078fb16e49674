import pytest
import torch

CUDA = torch.cuda.is_available()
SPARSE_CAPABLE = CUDA and torch.cuda.get_device_capability()[0] >= 8


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA with compute capability 8.0+ (2:4 tensor cores)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/") and not SPARSE_CAPABLE:
            item.add_marker(skip)
