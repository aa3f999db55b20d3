"""A Slurm cluster on 127.0.0.1 for the tests: Debian's munged, slurmctld and one slurmd per node (scripts/setup.sh
installs them), started as the test's own processes from a slurm.conf in a private temporary folder. Several nodes
are several slurmd on this machine (`slurmd -N n2`, each on its own port), enough for a real multi-node job step.

Everything is private to the cluster: munged runs with its own key, socket, pid and seed files; slurmctld and the
slurmd listen on free ports and keep their state, spool, pid and log files in the folder; clients find the cluster
through ``SLURM_CONF`` in ``cluster.env`` (never exported to the test process itself). ``stop`` cancels the
cluster's jobs, stops the daemons, and then ends any process still carrying this cluster's ``SLURM_CONF`` in its environment
(a job step's slurmstepd and the job's own processes), so nothing of it outlives the test.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin, not always on PATH


def unavailable() -> str | None:
    """Why the cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "the Slurm daemons run as root here (slurmd starts jobs as their users): not root"
    missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=SBIN_PATH)]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/setup.sh installs slurmctld slurmd munge slurm-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, nodes: int, cpus: int) -> None:
        self.root, self.cpus = root, cpus
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.conf = root / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}
        self.daemons: dict[str, subprocess.Popen] = {}

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(mode=0o700, parents=True)
        key = r / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text("\n".join([
            "ClusterName=mambadmtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'socket'},cred_expire=5",  # a requeued job may start again after 5 s
            "SlurmUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",  # %n: the node's name
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=sched_interval=2",  # a requeued job's begin time passes unnoticed up to this long
            "SlurmdParameters=config_overrides",  # the node has the CPUs below, whatever the machine has
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=300",  # ended jobs stay visible in squeue (with their final state) this long
            *(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={free_port()} CPUs={self.cpus} "
              "RealMemory=1000 State=UNKNOWN" for n in self.nodes),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self) -> None:
        r = self.root
        self.write_config()
        munge = r / "munge"
        self.spawn("munged", "--foreground", "--force", f"--key-file={munge / 'key'}", f"--socket={munge / 'socket'}",
                   f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}", f"--log-file={munge / 'log'}")
        self.wait_for(lambda: (munge / "socket").exists(), "munged's socket")
        self.spawn("slurmctld", "-D")
        self.wait_for(lambda: self.client_ok("scontrol", "ping"), "slurmctld answering")
        for node in self.nodes:
            self.spawn("slurmd", "-D", "-N", node, name=f"slurmd-{node}")
        self.wait_for(lambda: self.client_ok("sinfo", "-h", "-o", "%T %D") == f"idle {len(self.nodes)}",
                      "every node idle")

    def spawn(self, binary: str, *args: str, name: str = "") -> None:
        name = name or binary
        log = (self.root / "log" / f"{name}.out").open("w")
        self.daemons[name] = subprocess.Popen([shutil.which(binary, path=SBIN_PATH), *args], env=self.env,
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def client_ok(self, *cmd: str) -> str | None:
        """The command's stripped stdout when it exits 0, else None."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    def run(self, *cmd: str) -> str:
        """A Slurm client command against this cluster; its stdout (raises with its stderr when it fails)."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
        return done.stdout

    def wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not ready():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} waiting for {what}:\n{self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"no {what} after {timeout} s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").iterdir()) if p.is_file())

    def jobs(self) -> dict[str, str]:
        """State of every job the cluster still knows, by `<array job>_<index>`."""
        lines = self.run("squeue", "--array", "--noheader", "--states=all", "--format=%i %T").splitlines()
        return dict(line.split()[:2] for line in lines if line.strip())

    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            user = pwd.getpwuid(os.geteuid()).pw_name
            subprocess.run(["scancel", f"--user={user}"], env=self.env, capture_output=True, timeout=30)
            deadline = time.time() + 20
            while self.client_ok("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING") and \
                    time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.daemons.values()):  # the slurmd, slurmctld, then munged they authenticate through
            end(proc)
        for pid in carrying(f"SLURM_CONF={self.conf}"):  # job steps and job processes left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def end(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def carrying(variable: str) -> list[int]:
    """Processes other than this one whose environment holds exactly `variable` (NAME=value)."""
    marker, found = b"\0" + variable.encode() + b"\0", []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in b"\0" + (d / "environ").read_bytes() + b"\0":
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@contextmanager
def slurm_cluster(nodes: int = 1, cpus: int = 2) -> Iterator[SlurmCluster]:
    """A running cluster of `nodes` nodes n1, n2, ... with `cpus` CPUs each; stopped (every daemon and job of it) on
    exit, even on failure. The folder is short (munged's socket path must stay under ~107 characters) and removed at
    the end."""
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    cluster = SlurmCluster(root, nodes, cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
