"""Data safety: the demo generator and the ``demo_data`` block never delete or overwrite files they did
not write, and nothing but the quickstart writes the quickstart's data folder."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from lmms_engine.data.demo import DEMO_MARKER, foreign_entries, generate_demo_dataset
from lmms_engine.data.demo import DemoDataConfig, ensure_demo_data
from lmms_engine.launch.config import check_pipeline
from lmms_engine.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overwrite", [False, True])
def test_demo_data_block_refuses_a_folder_holding_a_users_file(tmp_path, overwrite):
    out = tmp_path / "data"
    out.mkdir()
    mine = out / "my_annotations.json"
    mine.write_text('{"mine": 1}')
    config = DemoDataConfig(output_dir=str(out), num_train=2, num_eval=1, overwrite=overwrite)
    with pytest.raises(ConfigError, match=r"my_annotations\.json.*choose another folder"):
        ensure_demo_data(config)
    assert mine.read_text() == '{"mine": 1}' and sorted(p.name for p in out.iterdir()) == ["my_annotations.json"]
    # --dry-run already says so: the check runs while the config is checked
    raw = [{"type": "demo_data", "config": {"output_dir": str(out), "overwrite": overwrite}},
           {"type": "evaluate", "config": {"checkpoint": str(tmp_path)}}]
    with pytest.raises(ConfigError, match=r"block 0 \(demo_data\)\.config\.output_dir: .*my_annotations\.json"):
        check_pipeline(raw)


def test_a_user_file_added_to_a_demo_folder_of_ours_is_not_deleted_by_regeneration(tmp_path):
    out = tmp_path / "data"
    ensure_demo_data(DemoDataConfig(output_dir=str(out), num_train=2, num_eval=1))
    assert foreign_entries(out) == []
    (out / "videos" / "extra_clip.mp4").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"videos/extra_clip\.mp4"):
        ensure_demo_data(DemoDataConfig(output_dir=str(out), num_train=3, num_eval=1))
    assert (out / "videos" / "extra_clip.mp4").read_bytes() == b"mine"


def test_the_generator_never_overwrites_a_train_json_it_did_not_write(tmp_path):
    (tmp_path / "train.json").write_text("[]")  # someone's records, no marker of ours
    with pytest.raises(ValueError, match=r"train\.json"):
        generate_demo_dataset(tmp_path, 2, 1, progress=False)
    assert (tmp_path / "train.json").read_text() == "[]" and not (tmp_path / "videos").exists()


def test_regenerating_our_folder_with_other_settings_says_so_and_leaves_no_stale_clips(tmp_path, caplog):
    out = tmp_path / "data"
    ensure_demo_data(DemoDataConfig(output_dir=str(out), num_train=3, num_eval=1))
    with caplog.at_level(logging.WARNING, logger="lmms_engine"):
        assert ensure_demo_data(DemoDataConfig(output_dir=str(out), num_train=2, num_eval=1)) is True
    assert "replacing the demo dataset in" in caplog.text and "'num_train': 3" in caplog.text
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["eval_00000.mp4", "train_00000.mp4",
                                                                  "train_00001.mp4"]
    # the generator itself, writing into its own folder again: clips of the larger run are removed
    direct = tmp_path / "direct"
    generate_demo_dataset(direct, 3, 0, progress=False)
    generate_demo_dataset(direct, 1, 0, progress=False)
    assert sorted(p.name for p in (direct / "videos").iterdir()) == ["train_00000.mp4"]
    assert json.loads((direct / DEMO_MARKER).read_text())["num_train"] == 1


def test_nothing_but_the_quickstart_generates_into_the_quickstarts_data_folder():
    """Benchmarks and docs regenerate demo data into folders of their own: a generator call (or
    ``--out``) next to ``quickstart`` and ``data`` would replace the quickstart's data with other settings."""
    writers = re.compile(r"ensure_demo_data|generate_demo_dataset|lmms_engine\.data\.demo")
    offenders = []
    for path in [*REPO.glob("benchmarks/*.py"), *REPO.glob("benchmarks/*.sh"), *REPO.glob("docs/*.md"),
                 REPO / "README.md"]:
        text = path.read_text(encoding="utf-8")
        if not writers.search(text):
            continue
        for line in text.splitlines():
            if re.search(r"quickstart.{0,8}data", line) and not line.lstrip().startswith("#"):
                if not re.search(r"(data_path|eval_data_path|--data-path)", line):  # reading is fine
                    offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert offenders == []
