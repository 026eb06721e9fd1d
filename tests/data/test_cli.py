"""`selfaugment data prepare|show` end to end on a small image folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfaugment.cli import main


def test_prepare_then_reuse_then_show(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "prepared"
    command = ["data", "prepare", str(image_folder), "--store", str(store), "--storage-size", "32"]
    assert main([*command, "--shard-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    uri = lines[-1]
    assert uri.startswith(str(store)) and "12 images" in lines[0]
    assert "4 shard(s) built, 0 kept" in lines[1]
    assert "skipped dog/broken.jpg: UnidentifiedImageError" in "\n".join(lines)

    assert main([*command, "--shard-size", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reused"] is True and summary["uri"] == uri and summary["count"] == 12

    assert main(["data", "show", uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["classes"] == ["cat", "dog"] and shown["skipped"]["count"] == 1
    assert shown["settings"]["storage_size"] == 32 and "reused" not in shown


def test_bad_input_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["data", "prepare", str(missing), "--store", str(tmp_path / "s")]) == 2
    assert f"no such file or folder: {missing}" in capsys.readouterr().err
    assert main(["data", "show", str(tmp_path / "s" / "nothing-00")]) == 2
    assert "no prepared dataset here" in capsys.readouterr().err
    assert (
        main(["data", "prepare", "sklearn:digits", "--format", "npz", "--store", str(tmp_path)])
        == 2
    )
    assert "conflicts with uri" in capsys.readouterr().err
