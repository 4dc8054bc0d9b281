"""Shared test settings and fixtures.

- One CPU thread per test process: the CI machines have 2 cores and several suites run at once, and
  single-threaded kernels make float results independent of the thread count.
- ``data_dir``: the demo dataset (its default 64 + 16 clips), generated once per session.
- ``data``: a two-record, text-only ``train.json`` in the test's own ``tmp_path`` (for config checks).

Markers (``pyproject.toml``): ``slow`` for whole training runs, ``distributed`` for tests that start
several processes; both still run in ``make test``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_support import demo_data_dir

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset with the ``demo_data`` block's default settings (see ``train_support``)."""
    return demo_data_dir(tmp_path_factory)


TEXT_RECORD = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A text-only ``train.json`` of two records in ``tmp_path``."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps([TEXT_RECORD, TEXT_RECORD]))
    return path
