"""Start-up time and memory of opening a large JSONL of small records: lazy index vs parsing every record.

Writes ``--records`` (default 1,000,000) small text-only LLaVA records (an id, a question, an answer; about
170 bytes a line) to a temporary JSONL, then measures, each case in a fresh subprocess (so every case
starts cold in Python and its memory is its own), over ``--rounds`` rounds with the cases interleaved:

- ``engine build_dataset``: ``lmms_engine.data.build_dataset`` on the file (the tiny tokenizer built
  before the clock starts): indexing the line offsets, nothing parsed;
- ``engine + first sample``: the same, then loading one text sample (parse, validate, tokenize);
- ``engine check_records: at_start``: every record parsed and validated at build (the opt-in check);
- peer ``json.loads every line``: what a reader that keeps every record as a Python dict does (LLaVA-NeXT's
  ``json.load`` / lmms-engine's ``jsonlines`` list), in the same run.

Time: wall seconds from just before the call to just after it, median over rounds (min-max). Memory:
peak resident set of the subprocess (``ru_maxrss``) minus its resident set just before the call, and the
resident set just after the call minus the same (what stays).

Run: ``python benchmarks/data_sources.py [--records 1000000] [--rounds 3] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CASE = r"""
import json, resource, sys, time
case, path = sys.argv[1], sys.argv[2]
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
if case.startswith("engine"):
    from lmms_engine.data.dataset import build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.data.tokenizer import build_tiny_tokenizer
    tok, info = build_tiny_tokenizer(), ProcessorInfo(image_size=64, patch_size=8)
    config = {"data_path": path, "check_records": "at_start" if case == "engine_check" else "on_load"}
before = rss_mb()
start = time.perf_counter()
if case.startswith("engine"):
    ds = build_dataset(config, tok, info)
    if case == "engine_first":
        ds[0]
    n = len(ds)
else:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    n = len(records)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "memory_mb": peak - before, "kept_mb": rss_mb() - before, "records": n}))
"""

CASES = {
    "engine": "engine `build_dataset` (lazy index)",
    "engine_first": "engine `build_dataset` + first sample",
    "engine_check": "engine `check_records: at_start`",
    "peer": "peer: `json.loads` every line, list kept",
}


def write_records(path: Path, count: int) -> int:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            record = {"id": f"sample-{i:07d}", "source": "synthetic",
                      "conversations": [{"from": "human", "value": f"What happens in clip {i}?"},
                                        {"from": "gpt", "value": f"A shape moves {('left', 'right', 'up')[i % 3]}."}]}
            out.write(json.dumps(record) + "\n")
    return path.stat().st_size


def run(case: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", CASE, case, str(path)], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        size = write_records(path, args.records)
        results: dict[str, list[dict]] = {case: [] for case in CASES}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for case in CASES:
                results[case].append(run(case, path))
                print(case, results[case][-1], flush=True)
        load_after = os.getloadavg()[0]
    peer = statistics.median(r["seconds"] for r in results["peer"])
    peer_mb = statistics.median(r["memory_mb"] for r in results["peer"])
    rows = []
    for case, label in CASES.items():
        seconds = [r["seconds"] for r in results[case]]
        memory = [r["memory_mb"] for r in results[case]]
        kept = statistics.median(r["kept_mb"] for r in results[case])
        med, mem = statistics.median(seconds), statistics.median(memory)
        rows.append(f"| {label} | {med:.2f} | {min(seconds):.2f}-{max(seconds):.2f} | {mem:.0f} | {kept:.0f} | "
                    f"{med / peer:.3f}x | {mem / peer_mb:.3f}x |")
    markdown = "\n".join([
        "## Opening a large JSONL (`benchmarks/data_sources.py`)",
        "",
        machine_line(("torch", "transformers", "numpy")) + f"; 1-minute load average {load:.1f} at the start, "
        f"{load_after:.1f} at the end.",
        "",
        f"{args.records:,} small text-only LLaVA records (id, question, answer) in one JSONL of {size / 2**20:.0f} MiB. "
        f"Each case in a fresh subprocess, {args.rounds} rounds, cases interleaved; time = median wall seconds "
        "of the call (min-max); peak memory = peak resident set minus the resident set before the call; kept = "
        "resident set after the call minus before (medians).",
        "",
        "| case | start-up (s) | min-max (s) | peak memory (MB) | kept after (MB) | time / peer | "
        "peak memory / peer |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "The lazy index holds three int64 per record (byte start, byte end, line number: 24 bytes) plus one "
        "byte of the bad-record table; a record is parsed when it is loaded.",
    ])
    print(markdown)
    if not args.no_write:
        print(f"wrote {write_section('data_sources', markdown)}")


if __name__ == "__main__":
    main()
