"""Where a workflow run's time went: each Snakemake job's wall time beside the work its stage reports.

    python benchmarks/timeline.py [.snakemake/log/LATEST.snakemake.log] [--project .]

Reads Snakemake's log of a run (default: the newest under .snakemake/log/) for each job's start and finish (whole
seconds, as Snakemake stamps them), and the project's outputs for the work inside: a training job's epochs'
`seconds` (metrics JSON), an evaluation's clean pass and attacks' `seconds` (result JSON). Prints one row per job
in start order (start, end and wall in seconds from the first job's start; work; wall minus work), then the sums
per rule, and the makespan."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from collections import defaultdict
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$")


def jobs(log: Path) -> list[dict]:
    """[{rule, wildcards, start, end}] from a Snakemake log."""
    out, by_id, now, rule = [], {}, None, None
    for line in log.read_text().splitlines():
        if m := STAMP.match(line):
            now = dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif (m := re.match(r"\s+jobid: (\d+)", line)) and rule:
            by_id[m.group(1)] = job = {"rule": rule, "wildcards": {}, "start": now, "end": None}
            out.append(job)
            rule = None
        elif (m := re.match(r"\s+wildcards: (.*)", line)) and out:
            out[-1]["wildcards"] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
        elif m := re.match(r"Finished jobid: (\d+)", line):
            by_id[m.group(1)]["end"] = now
    return [j for j in out if j["end"] is not None]


def work(project: Path, job: dict) -> float | None:
    """The seconds a job's stage reports as its work, if it reports any."""
    w = job["wildcards"]
    if job["rule"] in ("train", "pretrain"):
        folder = "train" if job["rule"] == "train" else "teachers"
        path = project / f"metrics/{folder}/{w['method']}_{w['dataset']}_seed{w['seed']}.json"
        return sum(e["seconds"] for e in json.loads(path.read_text())["epochs"]) if path.exists() else None
    if job["rule"] == "evaluate":
        path = project / f"results/seeds/{w['method']}_{w['dataset']}/seed{w['seed']}.json"
        return sum(json.loads(path.read_text())["seconds"].values()) if path.exists() else None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", nargs="?", help="a Snakemake log (default: the newest in PROJECT/.snakemake/log)")
    ap.add_argument("--project", default=".", help="the project folder (default: .)")
    a = ap.parse_args()
    project = Path(a.project)
    log = Path(a.log) if a.log else max((project / ".snakemake/log").glob("*.snakemake.log"))
    rows = jobs(log)
    t0 = min(j["start"] for j in rows)
    since = lambda t: (t - t0).total_seconds()  # noqa: E731
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    print(f"{log}\n{'start':>6} {'end':>6} {'wall':>6} {'work':>6} {'other':>6}  job")
    for j in sorted(rows, key=lambda j: j["start"]):
        wall, done = since(j["end"]) - since(j["start"]), work(project, j)
        name = " ".join(f"{k}={v}" for k, v in j["wildcards"].items())
        other = "" if done is None else f"{wall - done:6.0f}"
        print(f"{since(j['start']):6.0f} {since(j['end']):6.0f} {wall:6.0f} "
              f"{'' if done is None else f'{done:6.0f}':>6} {other:>6}  {j['rule']} {name}")
        s = sums[j["rule"]]
        s[0] += 1
        s[1] += wall
        s[2] += done or 0.0
    print("\nper rule: jobs, wall s, work s")
    for rule, (n, wall, done) in sums.items():
        print(f"  {rule:10} {n:3d} {wall:7.0f} {done:7.0f}")
    print(f"makespan {max(since(j['end']) for j in rows):.0f} s (first job's start to last job's end)")


if __name__ == "__main__":
    main()
