"""`lidit generate` and `lidit serve reload` against the running server."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cli.main import main
from tests.serving.conftest import Served


def test_generate_writes_pngs(served: Served, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "generate",
            "--url",
            served.url,
            "--prompt",
            "a red circle",
            "--prompt",
            "two blue squares",
            "--n",
            "2",
            "--size",
            "48x32",
            "--seed",
            "3",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 4
    assert all(Image.open(f).size == (48, 32) for f in files)
    assert capsys.readouterr().out.count(".png") == 4


def test_generate_reports_server_errors(served: Served, tmp_path: Path, capsys) -> None:
    rc = main(["generate", "--url", served.url, "--prompt", "a", "--size", "7", "--out", str(tmp_path)])
    assert rc == 1
    assert "HTTP 400" in capsys.readouterr().err


def test_serve_reload_command(served: Served, capsys) -> None:
    assert main(["serve", "reload", "--url", served.url]) == 0
    assert '"changed": false' in capsys.readouterr().out
    assert main(["serve", "reload", "--url", served.strict_url]) == 1  # admin endpoints off -> 403
    assert "HTTP 403" in capsys.readouterr().err
