"""A throw-away one-node Slurm cluster for the tests: controller and node on this machine, all state in a
temporary folder, stopped by pid at the end.

It installs nothing: the Debian packages ``slurmd slurmctld slurm-client munge`` come from ``make slurm``
(root; `.ci/run` calls it before the tests). `why_not` says in one sentence why a cluster cannot start
here (tests skip with it); `SlurmCluster.start` writes a ``slurm.conf`` (proctrack/linuxproc,
task/none, select/cons_tres, SlurmUser=root, this machine's CPUs), makes a munge key, starts
``munged``, ``slurmctld`` and ``slurmd`` in the foreground of their own processes and waits, bounded,
until ``sinfo`` shows the node idle (else an error with the tail of each daemon's log).
`SlurmCluster.env` is the environment a client (``sbatch``, ``squeue``, ``scancel``) needs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel", "scontrol", "sacct")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )


def why_not() -> str | None:
    """None when a cluster can start here, else the reason in one sentence."""
    if os.name != "posix" or os.geteuid() != 0:
        return (
            "a one-node Slurm cluster needs root (SlurmUser=root); run the tests as root after `make slurm`"
        )
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run `make slurm` (Debian, as root)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


SLURM_CONF = """\
ClusterName=iamrec-test
SlurmctldHost={host}(127.0.0.1)
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """One controller and one node on 127.0.0.1, with state, spool, logs and pids under `root`."""

    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a Slurm client talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(parts)

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        host = socket.gethostname().split(".")[0]
        # Slurm insists that the controller and the node are named as `hostname -s`; both listen on 127.0.0.1
        text = SLURM_CONF.format(
            host=host, root=self.root, ctld_port=ctld_port, d_port=d_port, cpus=self.cpus
        )
        self.conf.write_text(text)
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))  # a key made on the spot: nothing shared with the machine's munge
        key.chmod(0o400)
        munge.chmod(0o755)  # clients of every user reach the socket
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge}/munge.socket",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={self.root}/log/munged.log",
            f"--seed-file={munge}/munged.seed",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", "-D", "-c", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        self._wait(self._node_idle, timeout_s, f"the node {host} did not become idle in {timeout_s:.0f} s")
        return self

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.stdout.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            [_which(name) or name, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
        )

    def _node_idle(self) -> bool:
        res = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True, timeout=20
        )
        return res.returncode == 0 and res.stdout.strip() == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                exited = f" ({', '.join(dead)} exited)" if dead else ""
                raise RuntimeError(f"{what}{exited}; the daemons' logs end:\n{self.log_tails()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the daemons by their pids (slurmd, then slurmctld, then munged) and reap them."""
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ----------------------------------------------------------------------------- jobs

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; its id."""
        res = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        """The job's state as ``scontrol`` reports it (PENDING, RUNNING, COMPLETED, FAILED, ...)."""
        return self.show(job).get("JobState", "UNKNOWN")

    def show(self, job: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ...)."""
        res = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=20,
        )
        return dict(f.split("=", 1) for f in res.stdout.split() if "=" in f)

    def wait(self, job: int, timeout_s: float) -> str:
        """Wait, bounded, until the job has ended; its final state (a job still running is cancelled)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(0.5)
        self.scancel(job)
        return f"still {self.state(job)} after {timeout_s:.0f} s (cancelled)"

    def release(self, job: int) -> None:
        """Start a requeued job now: Slurm holds a requeued job for about 2 minutes (its BeginTime), which on
        a real cluster lets the node clean up; here it would only make the tests wait."""
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=self.env, check=True, timeout=20
        )

    def scancel(self, job: int, *args: str) -> None:
        subprocess.run(["scancel", *args, str(job)], env=self.env, check=True, timeout=20)
