"""How many CPUs this process may use: what process pools and loader workers are sized by.

os.cpu_count() counts the whole machine. A job is usually given less: a CPU set (SLURM's task affinity, `taskset`,
a container's cpuset), seen by os.sched_getaffinity, or a CPU-time quota (a container's or systemd unit's CPU
limit, cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`), which leaves every CPU visible but throttles the process
once it has used its share. Processes sized by the machine then outnumber the CPUs they can run on."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs in this process's affinity set, fewer when a cgroup CPU quota allows less (rounded down: a quota of
    1.5 CPUs keeps one process busy without being throttled, two would be), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        n = min(n, math.floor(quota))
    return max(1, n)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs: quota / period) on the path from this process's cgroup up to the root, in
    cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us` of the cpu controller); None when no
    limit is set or the files are not there."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: "0::/path"
            limits += _along(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path", mounted under its controllers' name
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += _along(mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _along(mount: Path, path: str, limit) -> list[float]:
    """The limits set in the cgroup `path` under `mount` and in every cgroup above it (a parent's limit binds its
    children). In a container the cgroup namespace makes `path` "/": the container's own cgroup is the mount."""
    d = mount / path.strip("/")
    out = []
    while True:
        value = limit(d)
        if value is not None:
            out.append(value)
        if d == mount or mount not in d.parents:
            return out
        d = d.parent


def _v2_limit(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
