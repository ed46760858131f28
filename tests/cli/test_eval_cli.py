from __future__ import annotations

import json

from cli.main import main
from lidit.starter import heldout_prompts, iter_split, write_image_folder


def test_eval_shapes_on_the_starter_split(starter_micro, capsys) -> None:
    rc = main(["eval", "shapes", "--split", "heldout", "--starter", str(starter_micro.root), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["n_images"] == 60 and report["overall"] >= 0.97
    assert set(report["by_position"]) == {"first", "middle", "last"}
    rc = main(["eval", "shapes", "--split", "train", "--starter", str(starter_micro.root), "--limit", "20"])
    out = capsys.readouterr().out
    assert rc == 0 and "overall" in out and "by object position" in out


def test_eval_shapes_on_an_image_folder(starter_micro, tmp_path, capsys) -> None:
    rows = list(iter_split(starter_micro, "heldout", limit=10))
    prompts = heldout_prompts(starter_micro, 10)
    # Pair each image with the next image's prompt for half the folder: the score must drop accordingly.
    items = [(r["image"], *prompts[i if i < 5 else (i + 1) % 10]) for i, r in enumerate(rows)]
    write_image_folder(tmp_path, items)
    rc = main(["eval", "shapes", "--images", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["n_images"] == 10 and 0.4 <= report["overall"] <= 0.6


def test_eval_shapes_errors(tmp_path, capsys) -> None:
    assert main(["eval", "shapes", "--starter", str(tmp_path / "none")]) == 2
    assert "lidit starter build" in capsys.readouterr().err
    assert main(["eval", "shapes", "--images", str(tmp_path)]) == 2
    assert "specs.jsonl" in capsys.readouterr().err
