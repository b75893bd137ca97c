import os

import pytest
import torch

from unipelt_fast._backend import triton_import_error

# Every launcher uses its default config in tests (no autotuning: a few compiles and timed
# launches per key would make the GPU suite slow); tests that autotune set it back to 1.
os.environ.setdefault("UNIPELT_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="gpu test: no CUDA device")
    interp_ok = os.environ.get("TRITON_INTERPRET") == "1" and triton_import_error() is None
    no_interp = pytest.mark.skip(reason="interpreter test: needs TRITON_INTERPRET=1 and triton")
    # slow tests are opt-in: UNIPELT_SLOW=1 or -m slow
    run_slow = os.environ.get("UNIPELT_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    no_slow = pytest.mark.skip(reason="slow test: set UNIPELT_SLOW=1 (or -m slow) to run it")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(no_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "interpreter" in item.keywords and not interp_ok:
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
