"""benchmarks/gpu_check.py in its CPU mode: every path of the script runs (a trainer case in a fresh
process, the torchrun-launched distributed case) and the table reports what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_cpu_mode_runs_the_trainer_and_the_torchrun_case(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows_file = tmp_path / "rows.json"
    code = gpu_check.main(["--cpu", "--steps", "2", "--warmup", "1", "--cases", "ar_sliding", "fsdp_sliding",
                           "--out", str(tmp_path / "runs"), "--json", str(rows_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(rows_file.read_text())
    assert set(rows) == {"ar_sliding", "fsdp_sliding"}
    for row in rows.values():
        assert row["steps"] == 1 and row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_mib"] > 0 and row["tflop_per_step"] > 0
    assert rows["fsdp_sliding"]["fsdp"] is False  # CPU: accelerate enables FSDP only on accelerators
    assert "| fsdp_sliding (DDP, 1 process: FSDP needs a GPU) |" in out and "| ar_sliding |" in out
