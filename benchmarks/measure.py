"""A command run as a user runs it, timed from start to exit, with the peak RSS of its processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the command and writes the largest max RSS of its processes (KiB) to argv[1]. A separate small process,
# because Linux carries a process's RSS high-water mark across exec: a job started straight from a benchmark that
# holds TensorFlow and models would report the benchmark's RSS as its own peak.
PEAK_RSS_WRAPPER = """import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as handle:
    handle.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


@dataclasses.dataclass(frozen=True)
class Measured:
    wall: float  # seconds, start to exit
    peak_rss_mb: float  # the largest max RSS of the command's processes
    console: str  # what it printed, stdout and stderr together


def run_measured(command: list[str], console_path: str) -> Measured:
    """Run `command` from the repository's folder, its console kept in `console_path`; RuntimeError with the
    console's tail when it fails."""
    peak_file = console_path + ".peak-rss"
    started = time.perf_counter()
    with open(console_path, "wb") as console:
        code = subprocess.call([sys.executable, "-c", PEAK_RSS_WRAPPER, peak_file, *command], cwd=REPO,
                               stdout=console, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    with open(console_path, encoding="utf-8", errors="replace") as handle:
        printed = handle.read()
    if code != 0:
        tail = "".join(printed.splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exited {code}: {' '.join(command)}\n{tail}")
    with open(peak_file, encoding="utf-8") as handle:
        peak_rss_mb = int(handle.read()) / 1024  # ru_maxrss is in KiB on Linux
    return Measured(wall, peak_rss_mb, printed)
