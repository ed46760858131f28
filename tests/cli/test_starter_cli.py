from __future__ import annotations

import json

from cli.main import main


def test_starter_build_reuses_and_prints_json(starter_micro, capsys) -> None:
    rc = main(
        ["starter", "build", "--out", str(starter_micro.root), "--preset", "micro", "--json", "--quiet"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and len(summary["reused"]) == 6
    rc = main(["starter", "build", "--out", str(starter_micro.root), "--preset", "micro"])
    out = capsys.readouterr()
    assert rc == 0 and "VAE PSNR" in out.out and "reused" in out.err


def test_starter_group_without_command_shows_help(capsys) -> None:
    assert main(["starter"]) == 2
    assert "build" in capsys.readouterr().out


def test_starter_build_rejects_unknown_override(tmp_path, capsys) -> None:
    assert (
        main(["starter", "build", "--out", str(tmp_path), "--preset", "micro", "--set", "vae.stepz=1"]) == 2
    )
    assert "vae.stepz: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
