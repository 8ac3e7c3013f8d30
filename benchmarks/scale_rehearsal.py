"""ImageNet's shape on the CPU: a 2-rank run over more shard files than a process may hold open.

    python benchmarks/scale_rehearsal.py                     # 2,640 training images in 1,320 shards, ulimit -n 1024
    python benchmarks/scale_rehearsal.py --images 5000 --epochs 3 --out rehearsal.json

1. Writes an ImageFolder of tiny JPEGs (tests/imagefolder_data.py; 4 classes) and prepares it (`advtrain prepare`)
   with --shard-images images per shard: ImageNet's 1,282 training shards are rehearsed by as many tiny ones.
2. Trains it (`advtrain train standard rehearsal`) with 2 ranks (training.devices 2, gloo on the CPU) and 2 DataLoader
   workers per rank, validating on the last --val-points training images after every epoch, every process under
   RLIMIT_NOFILE = --nofile (the usual default soft limit is 1,024).
3. Samples every process of the run every --interval seconds (the launcher, the ranks, their DataLoader workers): open
   descriptors (the entries of /proc/PID/fd) and peak resident memory (VmHWM in /proc/PID/status; a forked worker's
   counts the pages it shares with its rank). Prints, per role, the peak over its processes, and with --out writes
   the figures as JSON.

A sample every 20 ms can miss a peak that lasts less; VmHWM cannot (the kernel keeps it)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def overlay(raw: Path, args) -> dict:
    """The run's settings over the repository's params.yaml: small images, small model, 2 ranks on the CPU."""
    training = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.05, "val_points": args.val_points,
                "val_pgd_steps": 1, "select": "best", "precision": "fp32", "device": "cpu", "devices": 2}
    return {
        "runs": {"datasets": ["rehearsal"], "methods": ["standard"], "teacher_methods": [], "seeds": [0]},
        "datasets": {"rehearsal": {
            "source": {"name": "imagefolder", "path": str(raw), "size": 28, "shard_images": args.shard_images,
                       "workers": args.workers},
            "model": "small_cnn", "eps": "8/255", "alpha": "2/255",
            "augment": {"resized_crop": [0.35, 1], "flip": True}, "training": training,
            "evaluation": {"n_points": 64, "autoattack": "off", "pgd_steps": 2}}},
        "models": {"small_cnn": {"width": 8, "hidden": 64, "kernel": 3}},
    }


def children() -> dict[int, list[int]]:
    """Every process's children, from /proc/PID/stat (the parent is the field after the parenthesised name)."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def describe(pid: int, parent: int | None, parent_role: str | None) -> str | None:
    """launcher | rank N | worker of rank N | other; None when it is gone. The launcher is `advtrain train` itself,
    which runs torchrun's launcher in its own process (launcher.py), or a torchrun started by hand."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    command = cmdline(pid) or b""
    env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
    if parent_role and parent_role.startswith("rank ") and command == cmdline(parent):
        return f"worker of {parent_role}"  # a DataLoader worker: forked by its rank, not exec'd
    if b"torch.distributed.run" in command or (parent is None and b"RANK" not in env):
        return "launcher"
    if b"RANK" in env:
        return f"rank {env[b'RANK'].decode()}"
    return "other"


class Sampler(threading.Thread):
    """Samples the descendants of `root` until stopped: per pid, its role, peak descriptors and VmHWM (kB)."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        kids = children()
        stack = [(self.root, None, None)]
        while stack:
            pid, parent, parent_role = stack.pop()
            known = self.peaks.get(pid)
            role = describe(pid, parent, parent_role) if known is None or known["role"] == "other" else known["role"]
            if role is None:
                continue
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            p = self.peaks.setdefault(pid, {"role": role, "fds": 0, "hwm_kb": 0})
            if p["role"] == "other" and role != "other":  # named before it exec'd (a command that became the launcher)
                p["role"] = role
            p["fds"], p["hwm_kb"] = max(p["fds"], fds), max(p["hwm_kb"], hwm)
            stack += [(child, pid, p["role"]) for child in kids.get(pid, [])]


def run_sampled(cmd: list[str], cwd: Path, nofile: int, interval: float, timeout: float):
    """(completed process, per-pid peaks, seconds) of `cmd` run under RLIMIT_NOFILE = nofile."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        sampler.done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    seconds = time.perf_counter() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), sampler.peaks, seconds


def by_role(peaks: dict[int, dict]) -> dict[str, dict]:
    """Per role (workers of all ranks together, ranks each): processes seen, peak descriptors, peak VmHWM in MB."""
    out: dict[str, dict] = {}
    for p in peaks.values():
        role = "worker" if p["role"].startswith("worker") else p["role"]
        r = out.setdefault(role, {"processes": 0, "fds": 0, "hwm_mb": 0.0})
        r["processes"] += 1
        r["fds"] = max(r["fds"], p["fds"])
        r["hwm_mb"] = max(r["hwm_mb"], round(p["hwm_kb"] / 1024, 1))
    return out


def rehearse(work: Path, args) -> dict:
    """Generate, prepare and train (see the module's docstring); returns the figures and both commands' output."""
    sys.path.insert(0, str(ROOT / "tests"))
    from imagefolder_data import make_image_folder

    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw" / "rehearsal"
    if not (raw / "train").is_dir():
        make_image_folder(raw, n_train=args.images, n_test=args.test_images, size_range=(12, 24))
    params = work / "rehearsal.yaml"
    params.write_text(yaml.safe_dump(overlay(raw, args), sort_keys=False))
    advtrain = [sys.executable, "-m", "advtrain", "--params", f"{ROOT / 'params.yaml'},{params}"]
    figures: dict = {"nofile": args.nofile, "images": args.images, "shard_images": args.shard_images,
                     "val_points": args.val_points, "workers_per_rank": args.workers, "ranks": 2,
                     "epochs": args.epochs}
    prep, _, prep_s = run_sampled([*advtrain, "prepare", "rehearsal"], work, args.nofile, args.interval, 600)
    figures["prepare_seconds"] = round(prep_s, 1)
    figures["prepare_rc"] = prep.returncode
    if prep.returncode == 0:
        meta = json.loads((work / "data/prepared/rehearsal/meta.json").read_text())
        figures["train_shards"] = len(meta["splits"]["train"]["shards"])
        figures["val_shards"] = len({k // args.shard_images for k in range(args.images - args.val_points,
                                                                          args.images)})
        train, peaks, train_s = run_sampled([*advtrain, "train", "standard", "rehearsal", "--restart"], work,
                                            args.nofile, args.interval, 900)
        figures.update(train_seconds=round(train_s, 1), train_rc=train.returncode, roles=by_role(peaks),
                       processes=sorted((p["role"], p["fds"], round(p["hwm_kb"] / 1024, 1)) for p in peaks.values()))
        figures["output"] = (train.stdout + train.stderr)[-6000:]
    else:
        figures["output"] = (prep.stdout + prep.stderr)[-6000:]
    return figures


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="the folder to work in (default: a temporary one)")
    ap.add_argument("--images", type=int, default=2640, help="training images")
    ap.add_argument("--test-images", type=int, default=64)
    ap.add_argument("--shard-images", type=int, default=2)
    ap.add_argument("--val-points", type=int, default=1040)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=200, help="the global batch (each rank reads half)")
    ap.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE of every process of the run")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.work is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            figures = rehearse(Path(tmp), args)
    else:
        figures = rehearse(args.work, args)
    rc = figures.get("train_rc", figures["prepare_rc"])
    print(f"{figures['images']} training images, {figures.get('train_shards', '?')} training shards of "
          f"{figures['shard_images']}; validation: {figures['val_points']} images in {figures.get('val_shards', '?')} "
          f"shards; 2 ranks x {figures['workers_per_rank']} workers; ulimit -n {figures['nofile']}")
    print(f"prepare {figures['prepare_seconds']} s; train {figures.get('train_seconds', '-')} s, exit status {rc}")
    for role, r in sorted(figures.get("roles", {}).items()):
        print(f"  {role:>10}: {r['processes']} process(es), peak {r['fds']} open descriptors, peak RSS "
              f"(VmHWM) {r['hwm_mb']} MB")
    if rc:
        print(figures["output"])
    if args.out:
        args.out.write_text(json.dumps({k: v for k, v in figures.items() if k != "output"}, indent=2) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
