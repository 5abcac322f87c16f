import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Triton's CPU interpreter runs the statistics kernel (tests/test_flash_stats.py); it must be chosen before Triton is
# first imported. Diagnosis on a CPU takes the kernel only when asked for it, so other tests are unaffected.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite runs in two pytest-xdist workers (pyproject.toml): one thread each, here and in the processes the
# tests start, so that the two share the cores instead of spinning against each other (the CPU time of
# two-thread workers grew by 60%).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from helpers import plant_collapse, save_model, tiny_model  # noqa: E402

PLANTED = [(0, 3), (2, 1)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_model(tiny_model(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory):
    model = tiny_model()
    plant_collapse(model, PLANTED)
    return save_model(model, tmp_path_factory.mktemp("planted"))
