"""The workflow on a real SLURM cluster through Snakemake's executor plugin: Debian's slurmctld, slurmd and munge
(22.05), started here as one node on 127.0.0.1 with every file in a temporary folder, and stopped afterwards."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, env, make_project, run

SBIN = ("/usr/sbin", "/usr/bin")
CONF = """\
ClusterName=advtrain-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
StateSaveLocation={base}/spool/ctld
SlurmdSpoolDir={base}/spool/d
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
SwitchType=switch/none
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# The tiny jobs on this node: 2 threads each, as the local run (the rules ask cpus_per_task = threads), and less memory
# than the rules' CIFAR-size defaults, so that two jobs fit at once; no GPUs (training.device is cpu).
# Status every 2 s, not the profile's 20 s then every 10 s (kind to a shared slurmctld; here each wait is idle time).
RESOURCES = ["--cores", "2", "--default-resources", "slurm_partition=debug", "runtime=20",
             "--set-resources", "train:mem_mb=3000", "evaluate:mem_mb=3000", "pretrain:mem_mb=3000",
             "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]


def tool(name: str) -> str:
    path = shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)
    if path is None:
        pytest.fail(f"{name} is missing: `make test` installs Debian's slurmctld, slurmd, slurm-client and munge")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """munged, slurmctld and slurmd as child processes; yields the environment that reaches them (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("the single-node cluster runs slurmd and munged as root")
    base = tmp_path_factory.mktemp("slurm")
    for d in ("munge", "spool/ctld", "spool/d", "log", "run", "bin"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "munge").chmod(0o755)
    conf = base / "slurm.conf"
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 ** 20 - 512
    conf.write_text(CONF.format(base=base, ctld_port=free_port(), slurmd_port=free_port(), cpus=os.cpu_count(),
                                mem_mb=mem_mb))
    # snakemake-executor-plugin-slurm-jobstep clears SLURM_* (SLURM_CONF too) before its inner srun; a real cluster
    # has /etc/slurm/slurm.conf, this one only SLURM_CONF, so its srun gets it back from a wrapper on the PATH
    srun = base / "bin" / "srun"
    srun.write_text(f'#!/bin/sh\nexport SLURM_CONF={conf}\nexec {tool("srun")} "$@"\n')
    srun.chmod(0o755)
    e = {**env(), "SLURM_CONF": str(conf), "PATH": f"{base / 'bin'}{os.pathsep}{env()['PATH']}"}
    subprocess.run([tool("mungekey"), "--create", f"--keyfile={base}/munge/munge.key"], check=True)
    procs = []

    def start(name, argv):
        log = open(base / "log" / f"{name}.out", "wb")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=e))

    try:
        sock = base / "munge" / "munge.socket"
        # --force: munged wants every folder above its socket world-executable; pytest's temporary root is 0700
        start("munged", [tool("munged"), "--foreground", "--force", f"--socket={sock}",
                         f"--key-file={base}/munge/munge.key", f"--pid-file={base}/run/munged.pid",
                         f"--seed-file={base}/munge/munged.seed"])
        wait(sock.exists, 20, "munged")
        start("slurmctld", [tool("slurmctld"), "-D", "-i"])
        start("slurmd", [tool("slurmd"), "-D", "-N", "localhost"])

        def idle():
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): see {base}/log")
            out = subprocess.run([tool("sinfo"), "-h", "-o", "%T"], env=e, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        wait(idle, 60, "the node to be idle")
        yield {"env": e, "base": base}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def untimed(obj):
    """A result without what differs between two machines or two runs of the same computation."""
    skip = {"seconds", "eval_seconds", "seconds_per_attack", "versions", "images_per_s"}
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in skip}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def test_the_tiny_workflow_runs_on_slurm_and_gives_the_local_result(cluster, snakemake_project, tmp_path):
    proj = make_project(tmp_path / "p")  # the configuration snakemake_project ran locally
    target = "results/pgd_fashionmnist.json"
    # SIGKILL on timeout: with a status command that cannot answer, the plugin would wait forever and ignores SIGTERM
    p = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm", *RESOURCES,
                        "--jobs", "2", target], cwd=proj, env=cluster["env"], capture_output=True, text=True,
                       timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    jobs = set(re.findall(r"SLURM jobid (\d+)", out))
    # prepare, train and evaluate for each of the two seeds, and the aggregate: each a SLURM job
    assert len(jobs) == 6, out[-3000:]
    seen = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=cluster["env"], capture_output=True,
                          text=True).stdout
    assert {line.split()[0] for line in seen.splitlines() if line.endswith("COMPLETED")} >= jobs, seen
    here = json.loads((proj / target).read_text())
    local = json.loads((snakemake_project / target).read_text())
    assert untimed(here) == untimed(local)


def test_a_train_job_past_its_time_limit_is_resubmitted_and_ends_as_an_uninterrupted_run(cluster, snakemake_project,
                                                                                          tmp_path):
    """SLURM's own time limit: train's runtime is 1 minute and its training takes about three (each minibatch made
    slow by a sleep, so the CPU stays free; no early --signal, which a 1-minute job would get at once). SLURM kills
    the job at its limit, the SIGTERM makes it checkpoint at the next minibatch, Snakemake's retries submit it again,
    and it resumes there; the weights equal the local, uninterrupted run's."""
    proj = make_project(tmp_path / "limit")
    target = "models/pgd_fashionmnist_seed0.pt"
    e = {**cluster["env"], "ADVTRAIN_DELAY": "train.batch=1.5"}  # 114 minibatches: ~170 s of training
    p = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm", *RESOURCES,
                        "--set-resources", "train:mem_mb=3000", "train:runtime=1", "train:slurm_extra=''",
                        "--retries", "6", "--jobs", "1",
                        target], cwd=proj, env=e, capture_output=True, text=True, timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    seen = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T %k"], env=cluster["env"], capture_output=True,
                          text=True).stdout
    train = sorted((int(line.split()[0]), line.split()[1]) for line in seen.splitlines() if "rule_train" in line)
    assert sum(state == "TIMEOUT" for _, state in train) >= 2 and train[-1][1] == "COMPLETED", seen
    logs = "".join(f.read_text() for f in (proj / ".snakemake/slurm_logs").rglob("*.log"))
    assert "SIGTERM: in epoch" in logs and "resuming in epoch" in logs, logs[-4000:]
    here = torch.load(proj / target, weights_only=True)["model"]
    local = torch.load(snakemake_project / target, weights_only=True)["model"]
    assert here.keys() == local.keys() and all(torch.equal(here[k], local[k]) for k in local)


def slurm_plan(proj: Path, target: str, *extra: str) -> dict[str, dict]:
    """`snakemake --workflow-profile workflow/profiles/slurm -n TARGET`: each planned rule's threads and resources."""
    out = run([str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm", "-n", *extra, "--", target],
              proj).stdout
    jobs = {}
    for block in re.split(r"\n(?=\[|rule |localrule )", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            res = re.search(r"resources: (.*)", block)
            fields = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
            threads = re.search(r"threads: (\d+)", block)
            jobs[head.group(1)] = {**fields, "threads": threads.group(1) if threads else "1"}
    return jobs


def test_the_slurm_plan_asks_for_the_gpus_cpus_and_memory_the_shipped_recipes_need(tmp_path):
    """device: auto with a ResNet means GPUs on a cluster: one node, training.devices GPUs for training and
    evaluation.devices for evaluation, CPUs and memory per GPU; prepare of ImageNet gets a process per CPU and hours;
    the small CNN of the demo stays a CPU job."""
    proj = make_project(tmp_path / "plan")
    cifar = slurm_plan(proj, "results/deat_cifar10.json")
    assert {k: cifar["train"][k] for k in ("gpu", "nodes", "cpus_per_task", "mem_mb", "threads")} == \
        {"gpu": "1", "nodes": "1", "cpus_per_task": "8", "mem_mb": "16000", "threads": "8"}
    assert cifar["train"]["slurm_extra"] == "--signal=TERM@300" and int(cifar["train"]["runtime"]) >= 600
    assert cifar["evaluate"]["gpu"] == "1" and cifar["prepare"]["threads"] == "1"
    inet = slurm_plan(proj, "results/deat_imagenet.json")
    assert {k: inet["train"][k] for k in ("gpu", "nodes", "cpus_per_task", "mem_mb", "threads")} == \
        {"gpu": "8", "nodes": "1", "cpus_per_task": "64", "mem_mb": "256000", "threads": "64"}
    # evaluation.devices: 8, as training's: the ranks share every attack's batches
    assert {k: inet["evaluate"][k] for k in ("gpu", "nodes", "cpus_per_task", "mem_mb", "threads")} == \
        {"gpu": "8", "nodes": "1", "cpus_per_task": "64", "mem_mb": "256000", "threads": "64"}
    assert inet["prepare"]["threads"] == "16" and int(inet["prepare"]["runtime"]) >= 4 * 60
    assert int(inet["prepare"]["mem_mb"]) >= 16000
    # a partition given on the command line replaces the profile's set-resources, not the rule's early signal
    moved = slurm_plan(proj, "results/deat_cifar10.json", "--set-resources", "train:slurm_partition=gpu")
    assert moved["train"]["slurm_extra"] == "--signal=TERM@300" and moved["train"]["slurm_partition"] == "gpu"
    tiny = slurm_plan(proj, "results/pgd_fashionmnist.json")
    assert tiny["train"]["gpu"] == "0" and tiny["evaluate"]["gpu"] == "0"


def test_a_gpu_recipe_in_a_slurm_job_without_a_gpu_stops_at_once_in_one_line(tmp_path):
    proj = make_project(tmp_path / "nogpu")
    p = run([str(BIN / "advtrain"), "train", "deat", "cifar10"], proj, check=False,
            extra_env={"SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "cpu-node-7"})
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, p.stderr
    assert ("SLURM job 4242 on cpu-node-7 sees no GPU, but training.device auto with preact_resnet18 plans 1 for it"
            in err), err
    assert not (proj / "data/prepared/cifar10").exists()  # nothing started
