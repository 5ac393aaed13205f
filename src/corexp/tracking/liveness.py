"""Is the process behind a RUNNING run still alive? A rule that pid reuse and shared hostnames cannot fool.

A run records where its process lives: host name, the kernel's boot id, the pid namespace, the pid and the process's
start time (clock ticks after boot, /proc/<pid>/stat field 22), and refreshes a heartbeat tag every 30 s. Another
process decides:

- same boot id and same pid namespace (the same kernel and pid numbering, whatever the host name): alive exactly when
  a process with that pid exists *and* started at the recorded time, so a dead run whose pid was reused by an
  unrelated process is seen as dead;
- anything else (another machine, a cloned VM with the same host name, a container with host networking but its own
  pid namespace, a run from a corexp that did not record these): alive while its heartbeat is younger than
  `tracking.stale_after_s`. The writer's clock is never trusted ahead of the reader's: a heartbeat stamped in the
  reader's future counts from the moment the reader first saw that value (by its own clock), so a host whose clock
  runs ahead cannot keep a dead run alive; a heartbeat that is not a number is stale, with one warning.

A process is never judged by a pid it cannot interpret.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_S = 30.0  # a RUNNING job refreshes its heartbeat tag this often
log = logging.getLogger(__name__)
_FIRST_SEEN: dict[tuple[str, str], float] = {}  # (run id, heartbeat value) -> when this process first saw it
_WARNED: set[str] = set()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks after boot ('' when there is no such process or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class ProcessId:
    host: str
    boot_id: str
    pid_ns: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(socket.gethostname(), boot_id(), pid_namespace(), pid, start_ticks(pid))

    def tags(self) -> dict[str, str]:
        return {"host": self.host, "boot_id": self.boot_id, "pid_ns": self.pid_ns, "pid": str(self.pid),
                "pid_start": self.start}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_alive(tags: dict[str, str], start_time_ms: int, stale_after_s: float, now: float | None = None,
             here: ProcessId | None = None, run_id: str = "") -> bool:
    """Whether a RUNNING run's process may still be alive (False only when provably gone)."""
    here = here or ProcessId.current()
    same_kernel = bool(tags.get("boot_id")) and tags.get("boot_id") == here.boot_id and bool(here.boot_id)
    same_pids = bool(tags.get("pid_ns")) and tags.get("pid_ns") == here.pid_ns and bool(here.pid_ns)
    if same_kernel and same_pids and tags.get("pid", "").isdigit():
        pid = int(tags["pid"])
        if not pid_alive(pid):
            return False
        recorded = tags.get("pid_start", "")
        return not recorded or start_ticks(pid) in ("", recorded)  # another start time: the pid was reused
    now = time.time() if now is None else now
    return now - last_beat(tags.get("heartbeat") or "", start_time_ms / 1000, now, run_id) < stale_after_s


def last_beat(value: str, started: float, now: float, run_id: str = "") -> float:
    """When the run last showed life, by the reader's clock: the heartbeat's time when it is not in the reader's
    future, else the moment this process first saw that heartbeat value (the writer's clock runs ahead)."""
    if not value:
        return min(started, now)
    try:
        beat = float(value)
    except ValueError:
        beat = float("nan")
    if beat != beat or beat in (float("inf"), float("-inf")):
        if run_id not in _WARNED:
            _WARNED.add(run_id)
            log.warning("run %s has a malformed heartbeat tag %r; it counts as stale", run_id or "?", value[:40])
        return float("-inf")
    if beat <= now:
        return beat
    return _FIRST_SEEN.setdefault((run_id, value), now)
