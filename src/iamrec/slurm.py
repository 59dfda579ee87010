"""Slurm's time-limit notice, handled so that the requeued job resumes exactly: `SlurmRequeue`.

``slurm/iamrec.sbatch`` asks Slurm for ``SIGUSR1`` 90 s before the time limit (``--signal=SIGUSR1@90``);
``scancel --signal=USR1 JOB`` sends the same. Lightning's own SLURM handler saves a checkpoint *inside the
signal handler*, wherever each process happens to be: under DDP the ranks may be at different points
(one inside a gradient all-reduce), and a save between the optimizer step and the progress counters'
update resumes one step off. `SlurmRequeue` turns Lightning's handler off and only notes the signal; at
the end of the next optimizer step, when every rank's weights, optimizer and counters agree, the ranks
agree (one max all-reduce of a CPU flag over gloo: no device sync in an NCCL run's steps) that some rank
got it, write ``last.ckpt`` (`iamrec.run_checkpoints.RunCheckpoint`, atomically) exactly as a periodic save
does, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``, and the fit stops. The requeued job's ``--ckpt_path last`` resumes that checkpoint: the same weights, optimizer state,
data position and dropout masks as an uninterrupted run (tests/test_slurm.py compares the final weights).

Outside a Slurm job step (no ``SLURM_JOB_ID`` and ``SLURM_PROCID``) it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from iamrec.run_checkpoints import RunCheckpoint


def in_slurm_step() -> bool:
    """True inside a task that ``srun`` started (Lightning's SLURM detection reads the same variables)."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ


class SlurmRequeue(Callback):
    """Save, requeue and stop on Slurm's notice signal, at the end of an optimizer step (module docstring).

    Args:
        signal_name: The signal Slurm sends before the time limit (``--signal=SIGUSR1@90`` in the sbatch
            script); ``scancel --signal=USR1 JOB`` sends it by hand.
        requeue: After saving, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (the job needs
            ``--requeue``); false: save and stop only (resubmit the same command to resume).
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        if not hasattr(signal, signal_name) or not signal_name.startswith("SIG"):
            raise ValueError(f"requeue.signal_name={signal_name!r} is not a signal name (e.g. SIGUSR1).")
        self.signal_name = signal_name
        self.requeue = requeue
        self._noticed = False
        self._previous: Any = None
        self._group: Any = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not in_slurm_step():
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # Lightning's handler would save inside the signal handler
        self._noticed = False
        self._group = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the ranks agree on the flag over a CPU (gloo) group: no GPU sync in a step of an NCCL run
            gloo = torch.distributed.get_backend() == "gloo"
            self._group = (
                torch.distributed.group.WORLD if gloo else torch.distributed.new_group(backend="gloo")
            )
        signum = getattr(signal, self.signal_name)
        self._previous = signal.signal(signum, self._note)
        # system calls the signal interrupts (a gloo / NCCL socket read in another thread) are restarted,
        # not failed with EINTR: the notice must not disturb the step it lands in
        signal.siginterrupt(signum, False)

    def _note(self, signum: int, frame: Any) -> None:
        self._noticed = True  # acted on at the end of the current optimizer step

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._group is not None and self._group is not torch.distributed.group.WORLD:
            torch.distributed.destroy_process_group(self._group)
        self._group = None
        if self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None

    def _any_rank_noticed(self, trainer) -> bool:
        """Whether some rank got the signal: one max all-reduce of a CPU flag per step (no device sync)."""
        if self._group is None:
            return self._noticed
        flag = torch.tensor([int(self._noticed)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._previous is None or not self._any_rank_noticed(trainer):
            return
        saved = self._save(trainer)
        trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        job = os.environ.get("SLURM_JOB_ID", "?")
        where = f"saved {saved} at step {trainer.global_step}"
        if not self.requeue:
            print(f"iamrec: {self.signal_name}: {where}; resubmit the job to resume there.", file=sys.stderr)
            return
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if res.returncode == 0:
            print(
                f"iamrec: {self.signal_name}: {where}; job {job} requeued: it resumes there.", file=sys.stderr
            )
        else:
            reason = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
            print(
                f"iamrec: {self.signal_name}: {where}; scontrol requeue {job} failed ({reason}): resubmit "
                "the same command to resume there.",
                file=sys.stderr,
            )

    @staticmethod
    def _save(trainer) -> str:
        """Write the run checkpoint now (every rank takes part); its path."""
        for callback in trainer.checkpoint_callbacks:
            if type(callback) is RunCheckpoint and callback.save_last:
                callback._save_last_now(trainer)
                return callback.last_model_path
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # no run checkpoint: Lightning's hpc_ckpt_N.ckpt, which fit resumes
        return path
