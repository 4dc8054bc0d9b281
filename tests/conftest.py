"""Shared test settings and fixtures.

- One CPU thread per test process: the CI machines have 2 cores and several suites run at once, and
  single-threaded kernels make float results independent of the thread count.
- ``data_dir``: the demo dataset (its default 64 + 16 clips), generated once per session.

Markers (``pyproject.toml``): ``slow`` for whole training runs, ``distributed`` for tests that start
several processes; both still run in ``make test``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_support import demo_data_dir

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset with the ``demo_data`` block's default settings (see ``train_support``)."""
    return demo_data_dir(tmp_path_factory)
