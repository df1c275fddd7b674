"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import open_clip
import pytest
import torch


@pytest.fixture(scope="session")
def debug_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An open_clip ``debug`` CLIP state dict (seeded random weights) saved as a ``.pt`` file, as users pass one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "debug_clip.pt"
    torch.save(open_clip.create_model("debug").state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and a shared CI core is not oversubscribed); restored after.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
