"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
import re
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is rewritten by the script it names; run it again to refresh.\n"


def machine_line(packages: tuple[str, ...] = ("torch", "transformers", "av")) -> str:
    """One line naming the machine and the versions that matter for a measurement."""
    import os

    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            + ", ".join(versions))


def cpu_seconds() -> float:
    """CPU seconds this process has used so far, all its threads (FFmpeg's included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def core_share() -> float:
    """Fraction of one core a single busy thread gets right now (1.0 on an idle machine).

    Unlike the load average it does not count the benchmark's own threads that just ran."""
    import time

    import numpy as np

    a = np.random.default_rng(0).random((600, 600))
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(40):
        a = np.tanh(a * 1.0001)  # single-threaded numpy work (no BLAS threads involved)
    return (cpu_seconds() - c0) / (time.perf_counter() - t0)


def is_quiet(load_before: float, share_after: float) -> bool:
    """The machine was quiet for a run: low load before it, and a full core for one thread right after it
    (the load average after a run counts the run's own threads, so it is not used)."""
    return load_before < 1.5 and share_after >= 0.9


def spread(ratios: list[float]) -> str:
    """A ratio as quoted in the tables: the median over rounds and its (min-max), e.g. ``1.04x (0.98-1.12)``."""
    import statistics

    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def write_section(name: str, markdown: str) -> Path:
    """Replace (or append) the section ``name`` of RESULTS.md with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    return RESULTS
