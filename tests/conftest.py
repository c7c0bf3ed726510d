"""Shared test fixtures: devices, dtype tolerance table, seeded generators."""

from __future__ import annotations

import os

# Before numpy loads: OpenBLAS threads fight each other on small dense problems (6 s vs 60 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny test problems are 7-15x slower with spin-waiting threads on a loaded box.
torch.set_num_threads(1)

#: Tolerances built on machine epsilon: (rtol for eigenvalues / operator entries, eps).
EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps}
TOL = {torch.float64: 1e-8, torch.float32: 1e-3}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # Any test taking a ``device`` argument runs on every available device.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
