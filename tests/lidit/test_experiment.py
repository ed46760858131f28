"""The Ray-free part of ablation experiments: config validation, aggregation over seeds, table, plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from lidit.config import load_config
from lidit.experiment import (
    EvalSection,
    ExperimentConfig,
    evaluate_pipeline,
    markdown_table,
    mean_std,
    plot_by_position,
    reference_metrics,
    report_metrics,
    summarize,
)
from lidit.starter.evaluator import score_image

REPO = Path(__file__).resolve().parents[2]
LADDER = REPO / "configs" / "experiments" / "ablation_ladder.yaml"


def _config(**overrides: object) -> ExperimentConfig:
    data = {
        "cache_config": "c.yaml",
        "train_config": "t.yaml",
        "steps": 10,
        "batch_size": 4,
        "seeds": [0, 1],
        "encoders": [{"name": "a", "lm": "llama"}, {"name": "b", "lm": "qwen2", "instruction": False}],
        "variants": [{"name": "one", "encoders": ["a"]}, {"name": "two", "encoders": ["a", "b"]}],
    }
    data.update(overrides)
    return ExperimentConfig.model_validate(data)


def _report(overall: float, colour: float, count: float | None, first: float, last: float) -> dict:
    cats = {
        "colour": {"acc": colour, "n": 10},
        "shape": {"acc": 1.0, "n": 10},
        "binding": {"acc": 0.5, "n": 10},
    }
    if count is not None:
        cats["count"] = {"acc": count, "n": 4}
    return {
        "n_images": 10,
        "overall": overall,
        "categories": cats,
        "kinds": {},
        "by_position": {
            "first": {"acc": first, "n": 8},
            "middle": {"acc": None, "n": 0},
            "last": {"acc": last, "n": 8},
        },
    }


def test_shipped_ladder_config_is_valid_and_covers_the_issue() -> None:
    cfg = load_config(ExperimentConfig, LADDER)
    names = {v.name for v in cfg.variants}
    assert {"raw", "instruction", "refiner", "causal_refiner", "llm_b", "concat", "collaborative"} <= names
    by_name = {v.name: v for v in cfg.variants}
    assert "model.refiner_depth=0" in by_name["raw"].set
    assert "model.refiner_causal=true" in by_name["causal_refiner"].set
    assert "model.fusion=concat" in by_name["concat"].set
    instruction = {e.name: e.instruction for e in cfg.encoders}
    assert instruction[by_name["raw"].encoders[0]] is False
    assert instruction[by_name["instruction"].encoders[0]] is True
    assert len(cfg.seeds) >= 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variants": [{"name": "x", "encoders": ["nope"]}]}, "not in encoders"),
        ({"variants": [{"name": "x", "encoders": ["a"]}, {"name": "x", "encoders": ["b"]}]}, "unique"),
        ({"variants": [{"name": "x", "encoders": ["a"], "set": ["steps=5"]}]}, "budget"),
        ({"variants": [{"name": "x", "encoders": ["a"], "set": ["seed=3"]}]}, "budget"),
        ({"variants": [{"name": "a+b", "encoders": ["a"]}]}, "pattern"),
        ({"train_set": ["batch_size=7"]}, "budget"),
        ({"seeds": [1, 1]}, "unique"),
        ({"encoders": [{"name": "a", "lm": "llama"}, {"name": "a", "lm": "qwen2"}]}, "unique"),
        ({"encoders": [{"name": "a", "lm": "gpt2"}]}, "llama"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(**overrides)


def test_report_metrics_flattens_and_averages_the_present_categories() -> None:
    m = report_metrics(_report(0.2, colour=0.6, count=None, first=0.75, last=0.25))
    assert m["overall"] == 0.2
    assert m["category_mean"] == pytest.approx((0.6 + 1.0 + 0.5) / 3)
    assert m["cat.count"] is None and m["cat.position"] is None
    assert (m["pos.first"], m["pos.middle"], m["pos.last"]) == (0.75, None, 0.25)
    assert m["rel.holds"] is None and m["rel.inverse"] is None  # a report from before the direction split
    direction = {"holds": {"acc": 0.25, "n": 8}, "inverse": {"acc": 0.75, "n": 8}}
    m = report_metrics({**_report(0.2, 0.6, None, 0.75, 0.25), "relation_direction": direction})
    assert (m["rel.holds"], m["rel.inverse"]) == (0.25, 0.75)


def test_mean_std_is_the_sample_std_and_skips_missing() -> None:
    assert mean_std([0.2, 0.4, None]) == {
        "mean": pytest.approx(0.3),
        "std": pytest.approx(math.sqrt(0.02)),
        "n": 2,
    }
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}


def test_summary_keeps_config_order_and_aggregates_over_seeds() -> None:
    cfg = _config()
    results = {
        "two": {
            0: {"eval": _report(0.1, 0.4, 0.5, 0.6, 0.2), "train_seconds": 3.0, "final_loss": 0.5},
            1: {"eval": _report(0.3, 0.8, 0.25, 0.8, 0.4), "train_seconds": 5.0, "final_loss": 0.3},
        }
    }
    summary = summarize(cfg, results)
    assert [v["name"] for v in summary["variants"]] == ["one", "two"]
    one, two = summary["variants"]
    assert one["seeds"] == [] and one["metrics"]["overall"]["mean"] is None
    assert two["seeds"] == [0, 1] and two["n_images"] == 20 and two["train_seconds"] == 8.0
    assert two["metrics"]["overall"] == {
        "mean": pytest.approx(0.2),
        "std": pytest.approx(math.sqrt(0.02)),
        "n": 2,
    }
    assert two["metrics"]["cat.colour"]["mean"] == pytest.approx(0.6)
    assert two["metrics"]["pos.last"]["mean"] == pytest.approx(0.3)
    assert two["metrics"]["pos.middle"]["n"] == 0
    assert two["final_loss"]["mean"] == pytest.approx(0.4)
    assert summary["budget"] == {"steps": 10, "batch_size": 4, "seeds": [0, 1]}

    table = markdown_table(summary)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 2  # header, rule, one row per variant
    assert "| `two` | a, b | 2 | 0.200 ± 0.141 |" in table
    assert "| `one` | a | 0 | n/a |" in table


def test_reference_rows_bracket_the_table(starter_micro) -> None:
    from lidit.starter import iter_split

    items = [(r["image"], r["spec"], r["caption"]) for r in iter_split(starter_micro, "heldout", limit=30)]
    refs = reference_metrics(items)
    ceiling, chance = refs.values()
    assert ceiling["overall"] == 1.0 and ceiling["cat.colour"] == 1.0
    assert chance["overall"] < 0.5 and chance["cat.binding"] < ceiling["cat.binding"]
    summary = summarize(_config(), {})
    summary["references"] = refs
    table = markdown_table(summary)
    assert "| *real images, own prompts (ceiling)* | - | - | 1.000 | 1.000 |" in table
    assert table.strip().splitlines()[-1].startswith("| *real images, shuffled prompts (chance)* |")


def test_plot_is_written(tmp_path: Path) -> None:
    summary = summarize(_config(), {"one": {0: {"eval": _report(0.1, 0.4, 0.5, 0.6, 0.2)}}})
    path = plot_by_position(summary, tmp_path / "plot.png")
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


class _FakePipe:
    """Returns the held-out set's real images for their prompts: scores must match scoring them directly."""

    def __init__(self, lookup: dict[str, Image.Image]) -> None:
        self.lookup = lookup
        self.seeds: list[int] = []

    def __call__(self, prompts: list[str], seed: int, **kwargs: object) -> list[Image.Image]:
        self.seeds.extend(seed + k for k in range(len(prompts)))
        return [self.lookup[p] for p in prompts]


def test_evaluate_pipeline_scores_every_prompt_with_a_distinct_seed(starter_micro) -> None:
    from lidit.starter import iter_split

    rows = list(iter_split(starter_micro, "heldout", limit=7))
    lookup = {r["caption"]: r["image"] for r in rows}
    prompts = [(r["caption"], r["spec"]) for r in rows]
    pipe = _FakePipe(lookup)
    report, images = evaluate_pipeline(pipe, prompts, EvalSection(prompts=7, batch_size=3, seed=10))
    assert pipe.seeds == list(range(10, 17))  # independent of the batch size
    assert len(images) == 7 and report.n_images == 7
    direct = [score_image(r["image"], r["spec"], r["caption"]).overall for r in rows]
    assert report.overall == pytest.approx(sum(direct) / 7)
