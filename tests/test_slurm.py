"""`slurm/iamrec.sbatch` as shipped, under a real one-node Slurm (tests/slurm_cluster.py): 2 CPU tasks, DDP
over gloo, the tiny config; a USR1 requeue (twice in one job) that ends with the uninterrupted run's weights,
bit for bit; validation loss of 2 tasks = 1 process; and the failure modes a cluster user meets.

Every job is the shipped script with sbatch's documented overrides (``--ntasks-per-node=2 --gpus-per-node=0
--cpus-per-task=1``; VENV = the interpreter running the tests). Equality of weights is exact: both jobs run
the same float operations in the same order (2 tasks, one thread each). The cluster needs root and
``make slurm``; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from slurm_cluster import SlurmCluster, why_not

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "iamrec.sbatch"
STEPS, EVERY = 12, 1  # 40 samples, 4 per task and step: 5 steps an epoch, so the run crosses 2 epoch ends
OVERRIDES = ("--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")
pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


def job_args(processed_dir: Path, root: Path, *extra: str) -> list[str]:
    """The config and iamrec arguments after the script's name: tiny.yaml, made smaller."""
    return [
        str(REPO / "configs" / "tiny.yaml"),
        f"--data.data_dir={processed_dir}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=4",  # global steps 4, 8, 12: the last one validates the final weights
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=1.0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--data.batch_size=4",
        "--data.max_train_samples=40",
        "--data.max_eval_samples=11",  # odd: the distributed sampler repeats one sample on 2 tasks
        f"--checkpoint.every_n_train_steps={EVERY}",
        *extra,
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def job_env() -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): this checkout's code first, the
    virtual environment running these tests, one thread per task."""
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}


def submit(cluster: SlurmCluster, env, processed_dir: Path, root: Path, *extra: str, **more_env: str) -> int:
    root.mkdir(parents=True, exist_ok=True)
    args = (*OVERRIDES, str(SCRIPT), *job_args(processed_dir, root, *extra))
    return cluster.sbatch(*args, cwd=root, env={**env, **more_env})


def log_of(root: Path, job: int) -> str:
    path = root / f"slurm-{job}.out"  # where the script says: the submit folder
    return path.read_text(errors="replace") if path.exists() else ""


def step_of(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return -1


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


@pytest.fixture(scope="module")
def reference(cluster, job_env, processed_dir, tmp_path_factory):
    """The shipped script, uninterrupted: fit then test (the other tests compare against its weights)."""
    root = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    job = submit(cluster, job_env, processed_dir, root)
    state = cluster.wait(job, 240)
    print(f"reference job {job}: {state} in {time.monotonic() - start:.1f} s")
    return {"root": root, "job": job, "state": state, "log": log_of(root, job)}


def test_sbatch_as_shipped_fits_and_tests_with_two_tasks(reference):
    root, log = reference["root"], reference["log"]
    assert reference["state"] == "COMPLETED", log[-4000:]
    assert "1 node(s) x 2 task(s), cpu, ddp" in log
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    # ranks from srun, not Lightning's launcher: both processes were started by Slurm
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == STEPS
    metrics = next(root.rglob("test_metrics.json"))
    assert '"users": 11' in metrics.read_text()


def _wait_for(
    predicate, timeout_s: float, what: str, cluster: SlurmCluster, job: int, root: Path, ended=True
):
    """Wait, bounded, for `predicate`; fail early if the job has ended (`ended`: a job being requeued passes
    through an ended-looking state, so requeue waits turn it off)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        done = ended and cluster.state(job) in ("COMPLETED", "FAILED", "CANCELLED")
        if time.monotonic() > deadline or done:
            cluster.scancel(job)
            pytest.fail(f"{what} (job {cluster.state(job)}); log:\n{log_of(root, job)[-3000:]}")
        time.sleep(0.1)


def requeued_run(cluster, env, processed_dir, root: Path, signals: int, *extra: str) -> tuple[int, list[int]]:
    """A job signalled USR1 `signals` times, each once its run has saved a checkpoint 2+ steps past where it
    (re)started; its id and the steps at which it was signalled."""
    last = root / "checkpoints" / "last.ckpt"
    job = submit(cluster, env, processed_dir, root, *extra, TEST="0")
    at: list[int] = []
    for n in range(signals):
        _wait_for(
            lambda n=n: cluster.show(job).get("Restarts") == str(n), 120, f"no start {n}", cluster, job, root
        )
        # 2 steps past the checkpoint this start resumes: its signal handler is in place by then
        floor = max(step_of(last), 0) + 2
        _wait_for(
            lambda floor=floor: step_of(last) >= floor,
            120,
            f"no checkpoint at step {floor}",
            cluster,
            job,
            root,
        )
        at.append(step_of(last))
        cluster.scancel(job, "--signal=USR1")  # what Slurm sends 90 s before --time
        _wait_for(
            lambda n=n: cluster.show(job).get("Restarts") == str(n + 1),
            60,
            "no requeue",
            cluster,
            job,
            root,
            False,
        )
        _wait_for(lambda: cluster.state(job) == "PENDING", 60, "not pending", cluster, job, root, False)
        cluster.release(job)
    assert cluster.wait(job, 240) == "COMPLETED", log_of(root, job)[-4000:]
    return job, at


def assert_resumed_exactly(log: str, final: Path, reference: Path, requeues: int) -> None:
    """The job was requeued `requeues` times, each start after the first resumed mid-run, and it ends with
    the uninterrupted run's weights (`torch.equal`, every tensor)."""
    assert log.count("requeued: it resumes there") == requeues, log[-4000:]
    resumed = [int(s) for s in re.findall(r"resuming \S+ at step (\d+)\.", log)]
    assert len(resumed) == requeues and all(0 < s < STEPS for s in resumed), (resumed, log[-4000:])
    a, b = weights(reference), weights(final)
    assert a.keys() == b.keys() and step_of(final) == step_of(reference) == STEPS
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed at steps {resumed}; max |weight difference| to the uninterrupted run: {diff}")
    assert all(torch.equal(a[k], b[k]) for k in a), diff


def test_usr1_requeues_twice_and_resumes_to_the_uninterrupted_weights(
    cluster, job_env, processed_dir, reference, tmp_path
):
    start = time.monotonic()
    job, at = requeued_run(cluster, job_env, processed_dir, tmp_path, 2)
    print(f"job {job}: signalled at steps {at}, finished in {time.monotonic() - start:.1f} s")
    log = log_of(tmp_path, job)
    assert "restart 2" in log  # the script's first line in each start: one log for the three starts
    assert_resumed_exactly(
        log, tmp_path / "checkpoints" / "last.ckpt", reference["root"] / "checkpoints" / "last.ckpt", 2
    )


def test_the_resume_check_fails_when_the_requeued_job_starts_over(
    cluster, job_env, processed_dir, reference, tmp_path
):
    """`--ckpt_path=null` after the script's `--ckpt_path last`: the requeued job trains from step 0. Its
    final weights equal the reference's (a fresh run is deterministic), so the check must see that nothing
    was resumed."""
    job, _ = requeued_run(cluster, job_env, processed_dir, tmp_path, 1, "--ckpt_path=null")
    with pytest.raises(AssertionError):
        assert_resumed_exactly(
            log_of(tmp_path, job),
            tmp_path / "checkpoints" / "last.ckpt",
            reference["root"] / "checkpoints" / "last.ckpt",
            1,
        )


# ------------------------------------------------------------------------------ the same on 1 and N


def test_validation_loss_of_two_tasks_equals_one_process(
    reference, processed_dir, tmp_path, one_thread, capsys
):
    """val/loss over all target tokens: the 2-task job's last validation (11 samples, one repeated by the
    distributed sampler) equals one process (in-process) validating the same weights."""
    from iamrec.cli import main

    root = reference["root"]
    rows = pd.read_csv(next(root.rglob("metrics.csv")))
    two = rows.dropna(subset=["val/loss"]).set_index("step")["val/loss"]
    ckpt = root / "checkpoints" / "last.ckpt"
    main(["validate", "--config", *job_args(processed_dir, tmp_path), f"--ckpt_path={ckpt}"])
    one = float(re.search(r"val/loss\s*\S\s*([-0-9.e]+)", capsys.readouterr().out).group(1))
    print(f"val/loss: 2 Slurm tasks {float(two[STEPS - 1])!r}, 1 process {one!r}")
    assert two[STEPS - 1] == pytest.approx(one, rel=1e-5)


# ------------------------------------------------------------------------------------ failure modes


def test_a_checkpoint_of_another_world_size_is_refused(
    reference, processed_dir, tmp_path, one_thread, capsys
):
    """Each process reads its own shard: resuming 2 tasks' checkpoint with 1 process is refused (exit 2)."""
    from iamrec.cli import main

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes((reference["root"] / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                *job_args(processed_dir, tmp_path),
                f"--trainer.max_steps={STEPS + 2}",
                "--ckpt_path=last",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "written by 2 processes and this run has 1" in err and "--ntasks-per-node" in err, err
    assert step_of(ckpt) == STEPS  # untouched


def test_ntasks_per_node_other_than_devices_is_one_sentence(cluster, job_env, processed_dir, tmp_path):
    job = submit(cluster, job_env, processed_dir, tmp_path, "--trainer.devices=1", TEST="0")
    assert cluster.wait(job, 120) == "FAILED"
    log = log_of(tmp_path, job)
    assert "iamrec: error: You set `devices=1` in Lightning" in log and "--ntasks-per-node=2" in log, log[
        -3000:
    ]
    assert "Traceback" not in log


def _pid_of_rank(job: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == str(job) and env.get("SLURM_PROCID") == str(rank) and "iamrec" in cmd:
            return int(proc.name)
    return None


def test_a_task_that_dies_ends_the_job_naming_it(cluster, job_env, processed_dir, tmp_path):
    """Rank 1 killed mid-fit (as by the OOM killer): the job ends within a bounded time, srun names the task,
    and last.ckpt is a whole checkpoint to resume from."""
    job = submit(cluster, job_env, processed_dir, tmp_path, TEST="0")
    last = tmp_path / "checkpoints" / "last.ckpt"
    _wait_for(lambda: step_of(last) >= EVERY, 120, "no checkpoint", cluster, job, tmp_path)
    pid = _pid_of_rank(job, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    state = cluster.wait(job, 60)
    print(f"job {job} ended {state} {time.monotonic() - start:.1f} s after rank 1 was killed")
    assert state == "FAILED"
    log = log_of(tmp_path, job)
    assert re.search(r"srun: error: \S+: task 1: Killed", log), log[-3000:]
    assert 0 < step_of(last) < STEPS


def test_a_submit_folder_that_is_not_writable_is_one_sentence(cluster, job_env, tmp_path):
    """Root writes anywhere, so the folder is a read-only bind mount. Slurm itself fails a job whose log it
    cannot open there (before the script runs); with the log elsewhere (``--output``) the script stops with
    one sentence naming the folder, also left in the job's comment (``squeue -o %k``)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no bind mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        config = str(REPO / "configs" / "tiny.yaml")
        lost = cluster.sbatch(*OVERRIDES, str(SCRIPT), config, cwd=folder, env=job_env)
        log = tmp_path / "slurm-%j.out"
        job = cluster.sbatch(*OVERRIDES, f"--output={log}", str(SCRIPT), config, cwd=folder, env=job_env)
        states = cluster.wait(lost, 60), cluster.wait(job, 60)
        comment = subprocess.run(  # the job's record, Comment= included
            ["scontrol", "show", "job", str(job)], env=cluster.env, capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert states == ("FAILED", "FAILED")
    sentence = f"the submit folder {folder} is not writable"
    assert sentence in (tmp_path / f"slurm-{job}.out").read_text() and sentence in comment
