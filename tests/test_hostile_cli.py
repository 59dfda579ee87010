"""Hostile input for the command lines: broken configs, checkpoints and markers, a full or read-only disk,
crashes. Every case pins its outcome: the exit status, the sentence (naming the file or key), and what is
on disk afterwards (nothing new, the old file intact). In-process (`iamrec.cli.main`), one torch thread.

Expected failures end with one sentence and exit 2; unexpected ones (out of memory, distributed errors,
bugs) keep their traceback: the exception propagates unchanged.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iamrec import run_folder
from iamrec.cli import main
from iamrec.errors import expected_error

REPO = Path(__file__).resolve().parents[1]
SASREC_CONFIG = "configs/table2/ml100k/sasrec.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name paths relative to the repository root
    monkeypatch.setattr(sys, "argv", ["iamrec"])  # in-process CLI calls: no pytest arguments in sight
    monkeypatch.delenv("IAMREC_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--config=configs/tiny.yaml",
        f"--data.data_dir={data}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--model.warmup_steps=1",
        "--data.max_eval_samples=4",
        "--checkpoint.every_n_train_steps=1",
        *extra,
    ]


def cli(argv: list[str], entry=main) -> tuple[int, str]:
    """(exit status, stderr) of one in-process command."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            entry(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 0
    return code, err.getvalue()


def one_sentence(stderr: str, program: str = "iamrec") -> str:
    """The error line; there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{program}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, processed_dir) -> tuple[Path, str]:
    """A run folder after `fit --ckpt_path last` with no checkpoint yet: (root, its stderr)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(sys, "argv", ["iamrec"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        code, err = cli(["fit", *tiny(processed_dir, root), "--ckpt_path=last"])
        torch.set_num_threads(threads)
    assert code == 0, err[-3000:]
    return root, err


# ------------------------------------------------------------------------------------- config files

BAD_CONFIGS = {
    "yaml-syntax": ("trainer:\n  max_steps: [1, 2\n", r"{f} is not valid YAML: .* at line 3, column 1\."),
    "not-a-mapping": ("just some text\n", r"{f} holds no settings: a config file is a YAML mapping"),
    "wrong-type": (
        "model:\n  lr: fast\n",
        r'Parser key "model.lr": Expected a <class .float.>\. Got value: fast',
    ),
    "unknown-key": ("model:\n  learning_rate: 0.1\n", r"learning_rate"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_second_config_file_is_named(case, tmp_path, processed_dir):
    text, pattern = BAD_CONFIGS[case]
    bad = tmp_path / f"{case}.yaml"
    bad.write_text(text)
    root = tmp_path / "run"
    code, err = cli(["fit", *tiny(processed_dir, root), f"--config={bad}"])
    assert code == 2
    import re

    assert re.search(pattern.format(f=re.escape(str(bad))), one_sentence(err)), err
    assert not root.exists()  # nothing written


def test_a_missing_config_file_is_named(tmp_path, processed_dir):
    code, err = cli(["fit", *tiny(processed_dir, tmp_path / "run"), f"--config={tmp_path}/absent.yaml"])
    assert code == 2 and f"File does not exist: '{tmp_path}/absent.yaml'" in one_sentence(err)


@pytest.mark.parametrize(
    ("arg", "sentence"),
    [
        ("--model.nope=1", "unrecognized arguments: --model.nope=1 (--help lists the options)."),
        ("--model.ks=[]", "model.ks must list cut-offs K >= 1 (e.g. [1, 5, 10, 20]), got []."),
        ("--model.ks=[0,5]", "model.ks must list cut-offs K >= 1 (e.g. [1, 5, 10, 20]), got [0, 5]."),
        ("--model.num_beams=5", "model.num_beams=5 must be >= the largest K in model.ks=(1, 5, 10, 20)."),
        ("--data.batch_size=0", "data.batch_size must be an integer >= 1, got 0."),
    ],
)
def test_bad_arguments_give_one_sentence_and_write_nothing(arg, sentence, tmp_path, processed_dir):
    root = tmp_path / "run"
    code, err = cli(["fit", *tiny(processed_dir, root), arg])
    assert code == 2 and one_sentence(err) == f"iamrec: error: {sentence}"
    assert not root.exists()


@pytest.mark.parametrize(
    "content,sentence",
    [
        (None, "data.predict_file {file} does not exist; give a JSONL file of histories."),
        ("\n\n", "data.predict_file {file} holds no histories (it has no non-blank line)."),
        (
            '{"history": ["Xyzzy"]}\n[1, 2]\n',
            "data.predict_file {file}: no line holds a usable history (line 1: unknown title 'Xyzzy'; "
            "no catalogue title is close to it.)",
        ),
    ],
    ids=["missing", "blank", "no-usable-line"],
)
def test_predict_without_a_usable_history_gives_one_sentence(content, sentence, tmp_path, processed_dir):
    root, file = tmp_path / "run", tmp_path / "histories.jsonl"
    if content is not None:
        file.write_text(content)
    code, err = cli(["predict", *tiny(processed_dir, root), f"--data.predict_file={file}"])
    assert code == 2 and one_sentence(err) == f"iamrec: error: {sentence.format(file=file)}"
    assert not list(root.rglob("recommendations.jsonl"))


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("command", ["test", "validate"])
def test_evaluating_last_without_a_checkpoint_stops_and_writes_nothing(command, tmp_path, processed_dir):
    root = tmp_path / "run"
    code, err = cli([command, *tiny(processed_dir, root), "--ckpt_path=last"])
    assert code == 2
    assert one_sentence(err) == (
        f"iamrec: error: {command} --ckpt_path last: there is no checkpoint {root}/checkpoints/last.ckpt (no fit "
        "has saved one in that run folder); run fit first, or pass the checkpoint file as --ckpt_path."
    )
    assert not root.exists()  # no test_metrics.json of an untrained model


def test_fit_with_last_but_no_checkpoint_says_it_starts_fresh_and_saves_the_final_step(trained):
    root, err = trained
    assert (
        f"iamrec: --ckpt_path last: no checkpoint at {root}/checkpoints/last.ckpt yet; this fit starts from step 0."
        in err
    )
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2 and ckpt["IAMDataModule"]["train_order"]["batches_done"] == 2
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [
        "last.ckpt"
    ]  # no temp file, no last-v1


def test_a_fresh_fit_over_an_existing_checkpoint_says_so(trained, tmp_path, processed_dir):
    root = tmp_path / "run"
    shutil.copytree(trained[0] / "checkpoints", root / "checkpoints")
    code, err = cli(["fit", *tiny(processed_dir, root, "--trainer.max_steps=3")])
    assert code == 0, err[-3000:]
    assert f"iamrec: note: {root}/checkpoints/last.ckpt exists and this fit starts from step 0" in err
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    ("content", "sentence"),
    [
        (b"hello, I am a text file\n", "{f} is not a checkpoint (not a file torch.save wrote)."),
        ("half", "{f} is a truncated or corrupt checkpoint ("),
        ("weights-only", "{f} holds weights only (no optimizer or loop state); fit cannot resume it"),
        ("foreign", "{f} was not saved by this model: its hyper-parameters do not fit it ("),
        (None, "--ckpt_path {f}: no such checkpoint file."),
    ],
    ids=["text", "truncated", "weights-only", "foreign-model", "absent"],
)
def test_bad_checkpoints_are_named(content, sentence, trained, tmp_path, processed_dir):
    good = (trained[0] / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "given.ckpt"
    if content == "half":
        bad.write_bytes(good[: len(good) // 2])
    elif content == "weights-only":
        ckpt = torch.load(io.BytesIO(good), weights_only=True)
        torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters")}, bad)
    elif content == "foreign":
        torch.save({"state_dict": {}, "hyper_parameters": {"hidden_size": 64, "num_items": 3}}, bad)
    elif content is not None:
        bad.write_bytes(content)
    command = "fit" if content == "weights-only" else "test"
    root = tmp_path / "run"
    code, err = cli([command, *tiny(processed_dir, root), f"--ckpt_path={bad}"])
    assert code == 2 and one_sentence(err).startswith("iamrec: error: " + sentence.format(f=bad)), err
    assert not root.exists()


def test_the_sasrec_cli_has_the_same_checkpoint_rules(tmp_path, processed_dir):
    from iamrec.baselines.sasrec import main as sasrec_main

    root = tmp_path / "run"
    args = [
        f"--config={SASREC_CONFIG}",
        f"--data.data_dir={processed_dir}",
        f"--trainer.default_root_dir={root}",
    ]
    code, err = cli(["test", *args, "--ckpt_path=last"], sasrec_main)
    assert code == 2
    sentence = one_sentence(err, "iamrec.baselines.sasrec")
    assert f"test --ckpt_path last: there is no checkpoint {root}/checkpoints/last.ckpt" in sentence
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    code, err = cli(["test", *args, f"--ckpt_path={text}"], sasrec_main)
    assert code == 2 and f"{text} is not a checkpoint" in one_sentence(err, "iamrec.baselines.sasrec")
    assert not root.exists()


# ------------------------------------------------------------------------------------ disk faults


class FullDisk(io.BufferedWriter):
    """A file on a disk with `room` bytes left: the write that crosses it fails with ENOSPC (after
    writing what fits, as a real disk does)."""

    room = 2048

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        left = self.room - self.tell()
        if len(view) > left:
            super().write(view[: max(left, 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(view)


def failing_open(code: int):
    """`open` for `run_folder`: binary writes fail with `code` (ENOSPC mid-file, EROFS at open)."""

    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode:
            if code == errno.ENOSPC:
                return FullDisk(io.FileIO(path, "wb"))
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    return opener


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(
    code, trained, tmp_path, processed_dir, monkeypatch
):
    root = tmp_path / "run"
    shutil.copytree(trained[0] / "checkpoints", root / "checkpoints")
    before = (root / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(run_folder, "open", failing_open(code), raising=False)
    code_, err = cli(["fit", *tiny(processed_dir, root), "--ckpt_path=last", "--trainer.max_steps=3"])
    assert code_ == 2
    last = root / "checkpoints" / "last.ckpt"
    assert one_sentence(err) == (
        f"iamrec: error: could not write the checkpoint {last} ({os.strerror(code)}); "
        "the previous checkpoint there is intact."
    )
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # the partial temp file is gone


def test_disk_full_while_writing_a_marker_keeps_the_old_one(tmp_path, monkeypatch):
    run_folder.mark_done(tmp_path, {"profile": "tiny", "seconds": 1.0})
    before = (tmp_path / "DONE").read_bytes()

    def full_text_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        if "w" in mode:
            f.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f

    monkeypatch.setattr(run_folder, "open", full_text_open, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        run_folder.mark_done(tmp_path, {"profile": "tiny", "seconds": 2.0, "commands": ["x" * 10_000]})
    assert (tmp_path / "DONE").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["DONE"]


def test_a_run_folder_that_cannot_be_a_folder_is_named(tmp_path, processed_dir):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    code, err = cli(["fit", *tiny(processed_dir, blocker / "run")])
    assert code == 2
    sentence = one_sentence(err)
    assert str(blocker) in sentence and "Not a directory (ENOTDIR)." in sentence
    assert blocker.read_text() == "I am a file"


@contextlib.contextmanager
def tmpfs(where: Path, size: int):
    where.mkdir(parents=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_a_real_full_then_read_only_disk(trained, tmp_path, processed_dir):
    """On a real tmpfs just big enough for one checkpoint: the second save fails with ENOSPC and the first
    stays; remounted read-only, `test` stops with EROFS and writes nothing."""
    size = (trained[0] / "checkpoints" / "last.ckpt").stat().st_size
    with tmpfs(tmp_path / "disk", size + size // 2) as disk:
        root = disk / "run"
        code, err = cli(["fit", *tiny(processed_dir, root)])
        last = root / "checkpoints" / "last.ckpt"
        assert code == 2
        assert one_sentence(err) == (
            f"iamrec: error: could not write the checkpoint {last} (No space left on device); "
            "the previous checkpoint there is intact."
        )
        assert torch.load(last, weights_only=True)["global_step"] == 1
        assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
        before = tree(disk)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, err = cli(["test", *tiny(processed_dir, root), "--ckpt_path=last"])
        assert code == 2 and one_sentence(err) == (
            f"iamrec: error: File is not creatable since parent directory not writable: '{root}/config.yaml'"
        )
        assert tree(disk) == before


# ----------------------------------------------------------------------------------------- markers


def test_a_truncated_done_marker_is_named_and_the_cell_runs_again(
    tmp_path, processed_dir, monkeypatch, capsys
):
    from iamrec.tables.plan import TableRun
    from iamrec.tables.runner import reproduce

    work = tmp_path / "work"
    (work / "data" / "processed").mkdir(parents=True)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "data" / "processed" / "ml100k").symlink_to(processed_dir)
    monkeypatch.chdir(work)
    root, out = work / "runs", work / "results" / "table2"
    reproduce(TableRun("table2", ["ml100k"], [0], "tiny", root, out, methods=["popular"]))
    run_dir = root / "ml100k" / "popular" / "seed0"
    done = run_dir / "DONE"
    done.write_text(done.read_text()[:15])  # a crash mid-write, as before the markers were atomic
    assert not run_folder.is_done(run_dir)
    with pytest.raises(run_folder.MarkerError, match=f"{done} is not a valid DONE record"):
        run_folder.read_done(run_dir)
    capsys.readouterr()
    reproduce(TableRun("table2", ["ml100k"], [0], "tiny", root, out, methods=["popular"]))
    said = capsys.readouterr().out
    assert f"ml100k/popular seed0: {done} is not a valid DONE record (truncated or corrupt JSON: " in said
    assert "Treating it as not done: it runs again." in said
    assert run_folder.is_done(run_dir) and json.loads(done.read_text())["profile"] == "tiny"


# ------------------------------------------------------------------------- unexpected: tracebacks


def test_out_of_memory_in_training_keeps_its_traceback(tmp_path, processed_dir, monkeypatch):
    from iamrec.lit_module import IAMRecModule

    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(IAMRecModule, "training_step", oom)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as info:
        main(["fit", *tiny(processed_dir, tmp_path / "run")])
    assert any(frame.name == "oom" for frame in info.traceback)  # the original traceback, down to the raise


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path, processed_dir, monkeypatch):
    monkeypatch.setenv("IAMREC_DEBUG", "1")
    with pytest.raises(ValueError, match="model.ks must list cut-offs"):
        main(["fit", *tiny(processed_dir, tmp_path / "run"), "--model.ks=[]"])


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as err:
        return err


def _torch_value_error() -> BaseException:
    try:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    except ValueError as err:
        return err
    raise AssertionError("torch accepted mismatched shapes")


@pytest.mark.parametrize(
    ("make", "sentence"),
    [
        (lambda: _raise(torch.OutOfMemoryError("CUDA out of memory")), None),
        (lambda: _raise(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error")), None),
        (lambda: _raise(torch.distributed.DistBackendError("NCCL communicator was aborted")), None),
        (lambda: _raise(KeyError("state_dict")), None),
        (_torch_value_error, None),  # a ValueError from inside torch is a bug, not the user's input
        (lambda: _raise(OSError(errno.EIO, "Input/output error", "/x")), None),
        (
            lambda: _raise(OSError(errno.ENOSPC, "No space left on device", "/x")),
            "/x: No space left on device (ENOSPC).",
        ),
        (
            lambda: _raise(PermissionError(errno.EACCES, "Permission denied", "/x")),
            "/x: Permission denied (EACCES).",
        ),
        (lambda: _raise(run_folder.CheckpointError("/x is not a checkpoint.")), "/x is not a checkpoint."),
    ],
    ids=[
        "oom",
        "nccl",
        "dist-backend",
        "bug-keyerror",
        "torch-valueerror",
        "eio",
        "enospc",
        "eacces",
        "ckpt",
    ],
)
def test_which_errors_are_expected(make, sentence):
    assert expected_error(make()) == sentence
