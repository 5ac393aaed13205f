"""Running a study's commands one at a time (scripts/scaling_study.py, scripts/transfer_study.py): each printed first,
its exit status and wall time after; --dry-run prints them only. The CPU is the scarce resource: one job at a time."""

from __future__ import annotations

import shlex
import subprocess
import time


def run_all(cmds: list[list[str]], dry_run: bool = False) -> int:
    """Run the commands in order; the number that failed."""
    failed = 0
    for cmd in cmds:
        print("$", shlex.join(cmd[1:]), flush=True)
        if dry_run:
            continue
        t0 = time.time()
        code = subprocess.call(cmd)
        failed += code != 0
        print(f"# exit {code} after {time.time() - t0:.0f} s", flush=True)
    return failed
