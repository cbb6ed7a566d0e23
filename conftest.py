"""pytest set-up shared by test_dark.py: where ../shared lives, and small-CPU defaults."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))  # CI has 2 cores; keep the suite predictable

SHARED = Path(__file__).resolve().parent.parent / "shared"


@pytest.fixture(scope="session")
def shared():
    """Path to ../shared. Skips with a reason when absent; fails instead when DARK_REQUIRE_SHARED=1 (CI)."""
    if not (SHARED / "README.md").exists():
        msg = f"{SHARED} is absent: reference fixtures, BPE vocabulary and HC18 sample not available"
        if os.environ.get("DARK_REQUIRE_SHARED") == "1":
            pytest.fail(msg + " (DARK_REQUIRE_SHARED=1 is set, so this is an error)")
        pytest.skip(msg)
    return SHARED


def pytest_configure(config):
    # coremltools and torch.export speak of their own deprecations on every conversion: noise, not our failures
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:coremltools.*")
    config.addinivalue_line("filterwarnings", "ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
    # OpenAI's CLIP .pt files are TorchScript: the tests that write one use torch.jit on purpose
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.[a-z_]+` is deprecated:DeprecationWarning")
