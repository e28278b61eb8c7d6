"""The process table read from /proc, for stopping processes by PID only: a process is named by its PID
and its start time (clock ticks after boot), so a reused PID is never mistaken for it. Used by the
command's reaper (belladonna.lifecycle.reaper) and by a worker flow run's watcher (infra.flow_run_exit).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, start time) of `pid`, or None if it is gone (a zombie, which has
    exited and waits only for its parent to read its status, counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]), int(fields[19]))


def start_time(pid: int) -> int | None:
    """The start time of `pid`, None if it is gone."""
    found = stat(pid)
    return None if found is None else found[2]


def descendants(root: int, group: int | None = None) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`, and of every member of process group
    `group` when given (Ray's agents stay in a flow run's group after their raylet is gone); `root`
    itself excluded."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != root:
            found = stat(int(entry.name))
            if found is not None:
                stats[int(entry.name)] = found
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    result: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in result:
                result[child] = stats[child][2]
                todo.append(child)
    if group is not None:
        result.update({pid: start for pid, (_, grp, start) in stats.items() if grp == group})
    return result


def kill_recorded(recorded: dict[int, int]) -> list[int]:
    """SIGKILL each recorded process whose start time still matches (never a reused PID); returns those."""
    killed = []
    for pid, start in recorded.items():
        if start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                continue
    return killed
