"""Shared bits of the benchmark scripts: machine facts, the load gate, and writing one section of
docs/benchmarks.md (read-modify-write of that section only, right before writing, atomic rename)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = ("# Benchmarks\n\nEvery number here comes from a script in scripts/; each section says the machine, "
              "the command, the date and the raw numbers.\n")


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def load_text() -> str:
    return "load average %.2f %.2f %.2f (1, 5, 15 min)" % loadavg()


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 15.0) -> tuple[float, bool]:
    """Wait until the 1-minute load is below `max_load` (at most `max_wait_s`). (load, quiet)."""
    deadline = time.time() + max_wait_s
    while True:
        one = loadavg()[0]
        if one < max_load:
            return one, True
        if time.time() >= deadline:
            print(f"load still {one:.2f} >= {max_load} after {max_wait_s:.0f} s: measuring anyway "
                  "(the numbers say so)", file=sys.stderr, flush=True)
            return one, False
        print(f"waiting for a quieter machine: 1-min load {one:.2f} >= {max_load}", file=sys.stderr, flush=True)
        time.sleep(poll_s)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    model = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024**2:.0f} GiB"
                break
    except OSError:
        pass
    return (f"{model}, {cores} cores usable (shared with other jobs), {ram} RAM; "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_line(before: str, quiet: bool, after: str) -> str:
    """The load averages around a measurement, flagged when it did not start on a quiet machine."""
    return f"before: {before}{'' if quiet else ' (NOT quiet)'}; after: {after}"


def record(mark: str, title: str, what: str, command: str, date: str, text: str) -> None:
    """Write the usual section: its title, what it measures, machine, command, date, then the printed
    output in a code block."""
    write_section(mark, "\n".join([f"## {title}", "", f"What: {what}", "", f"- Machine: {machine()}",
                                   f"- Command: `{command}`", f"- Date: {date}", "", "```", text, "```"]))


def write_section(mark: str, body: str) -> None:
    """Replace (or append) the text between <!-- mark:start --> and <!-- mark:end -->."""
    start, end = f"<!-- {mark}:start -->", f"<!-- {mark}:end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else DOC_HEADER  # read right before writing
    found = re.search(re.escape(start) + r".*?" + re.escape(end) + r"\n?", text, re.S)
    if found:
        text = text[:found.start()] + block + text[found.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = DOC.with_name(DOC.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    print(f"recorded in {DOC}", file=sys.stderr)
