"""The shared train step and the data-parallel strategies, Ray-free: two gloo processes on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec, TextFeatures
from lidit.layout import LayoutTargets
from tests.ports import free_port
from training.config import TrainConfig
from training.parallelize import REPLICATE_MAX_PARAMS_CPU, parallelize, resolve_strategy
from training.state import EMA, full_model_state, lr_at
from training.step import (
    HardNegatives,
    MetricWindow,
    build_optimizer,
    contrastive_term,
    hard_negative_term,
    layout_term,
    step_generator,
    train_step,
)

BRANCHES = [TextBranchSpec(name="a", hidden_size=24), TextBranchSpec(name="b", hidden_size=16)]
STEPS, RESUME_AT, PER_RANK = 4, 2, 2


def _cfg() -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "steps": STEPS,
            "batch_size": 2 * PER_RANK,
            # Two learning rates, so the resume tests restore an optimizer with two parameter groups.
            "optim": {"lr": 3e-3, "warmup_steps": 1, "ema_decay": 0.5, "text_lr_scale": 0.5},
        }
    )


def _model(**overrides: object) -> LiDiTGenerator:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = LiDiTGenerator(
        GeneratorConfig.from_preset("tiny", BRANCHES, dim=32, depth=2, heads=2, refiner_depth=1, **overrides)
    )
    with torch.no_grad():  # adaLN-Zero outputs exactly 0 at init: give the zeroed layers weights
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def _batch(rank: int, step: int) -> tuple[torch.Tensor, list[TextFeatures]]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    latents = torch.randn(PER_RANK, 4, 8, 8, generator=g)
    texts = []
    for spec in BRANCHES:
        mask = torch.ones(PER_RANK, 7, dtype=torch.bool)
        mask[0, 5:] = False  # ragged prompts
        texts.append(TextFeatures(torch.randn(PER_RANK, 7, spec.hidden_size, generator=g), mask, 3))
    return latents, texts


def _parallel_model(strategy: str) -> LiDiTGenerator:
    """`fsdp_keep`: FSDP2 with `reshard_after_forward=False` (gathered weights kept from forward to backward)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    keep = strategy == "fsdp_keep"
    return parallelize(_model(), mesh, strategy="fsdp" if keep else strategy, reshard_after_forward=not keep)


def _sharded_after_forward(strategy: str) -> bool:
    """Whether a DiT block's parameters are back to sharded DTensors after a forward (before backward)."""
    model = _parallel_model(strategy)
    latents, texts = _batch(dist.get_rank(), 0)
    model(latents, torch.full((PER_RANK,), 500.0), texts)
    return isinstance(next(model.backbone.blocks[0].parameters()), DTensor)


def _train(rank: int, strategy: str, steps: range, ckpt: Path | None, load: bool) -> dict:
    cfg = _cfg()
    model = _parallel_model(strategy)
    optim = build_optimizer(model, cfg)
    ema = EMA(model, cfg.optim.ema_decay)
    if load:
        model_sd, optim_sd = get_state_dict(model, optim)
        state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    window, losses = MetricWindow(), []
    for step in steps:
        latents, texts = _batch(rank, step)
        window.add(train_step(model, optim, ema, latents, texts, cfg, step, step_generator(0, rank, step)))
        losses.append(window.reduce()[0])
        window.reset()
    if ckpt is not None and not load:
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}, checkpoint_id=str(ckpt))
    return {"losses": losses, "ema": ema.full_state_dict(), "model": full_model_state(model)}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {"sharded_after_forward": {s: _sharded_after_forward(s) for s in ("fsdp", "fsdp_keep")}}
    for strategy in ("fsdp", "replicate", "fsdp_keep"):
        straight = _train(rank, strategy, range(STEPS), None, load=False)
        ckpt = Path(out) / f"ckpt-{strategy}"
        _train(rank, strategy, range(RESUME_AT), ckpt, load=False)
        resumed = _train(rank, strategy, range(RESUME_AT, STEPS), ckpt, load=True)
        results[strategy] = {"straight": straight, "resumed": resumed}
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    return torch.load(out / "results.pt")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_fsdp_and_replicas_train_the_same_weights(two_rank_results: dict) -> None:
    fsdp, rep = two_rank_results["fsdp"]["straight"], two_rank_results["replicate"]["straight"]
    assert fsdp["losses"] == pytest.approx(rep["losses"], rel=1e-5)
    _assert_same(fsdp["model"], rep["model"])
    _assert_same(fsdp["ema"], rep["ema"])  # EMA export gathers full, clean-named tensors under both
    assert fsdp["ema"].keys() == dict(_model().named_parameters()).keys()
    assert not torch.equal(
        fsdp["ema"]["backbone.final.linear.weight"], fsdp["model"]["backbone.final.linear.weight"]
    )


def test_fsdp_keeping_gathered_weights_trains_the_same(two_rank_results: dict) -> None:
    # scale.reshard_after_forward: false skips the second all-gather per block and step, nothing else
    assert two_rank_results["sharded_after_forward"] == {"fsdp": True, "fsdp_keep": False}
    fsdp, keep = two_rank_results["fsdp"]["straight"], two_rank_results["fsdp_keep"]["straight"]
    assert keep["losses"] == pytest.approx(fsdp["losses"], rel=1e-5)
    _assert_same(keep["model"], fsdp["model"])


def test_optimizer_kernels_follow_the_config() -> None:
    runs = {}
    for kind in ("auto", "foreach", "fused"):
        cfg = _cfg()
        cfg.optim.implementation = kind
        model = _model()
        optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
        runs[kind] = (optim.defaults["foreach"], optim.defaults["fused"])
        for step in range(2):
            latents, texts = _batch(0, step)
            train_step(model, optim, ema, latents, texts, cfg, step, step_generator(0, 0, step))
        runs[kind] += (full_model_state(model),)
    assert runs["auto"][:2] == (None, True)  # fused on every device, CPU included
    assert runs["foreach"][:2] == (True, None) and runs["fused"][:2] == (None, True)
    _assert_same(runs["fused"][2], runs["foreach"][2])  # same update rule, other kernels
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"optim": {"implementation": "apex"}})


@pytest.mark.parametrize("strategy", ["fsdp", "replicate", "fsdp_keep"])
def test_dcp_resume_matches_straight_run(two_rank_results: dict, strategy: str) -> None:
    run = two_rank_results[strategy]
    assert run["resumed"]["losses"] == pytest.approx(run["straight"]["losses"][RESUME_AT:], rel=1e-5)
    _assert_same(run["straight"]["ema"], run["resumed"]["ema"])
    _assert_same(run["straight"]["model"], run["resumed"]["model"])


def test_resolve_strategy() -> None:
    small, big = 3_500_000, REPLICATE_MAX_PARAMS_CPU + 1
    assert resolve_strategy("auto", "cpu", 2, small) == "replicate"
    assert resolve_strategy("auto", "cpu", 1, small) == "single"
    assert resolve_strategy("auto", "cpu", 2, big) == "fsdp"
    assert resolve_strategy("auto", "cuda", 8, small) == "fsdp"
    assert resolve_strategy("auto", "cpu", 2, small, bf16=True) == "fsdp"
    assert resolve_strategy("fsdp", "cpu", 1, small) == "fsdp"
    with pytest.raises(ValueError, match="bf16"):
        resolve_strategy("replicate", "cuda", 2, small, bf16=True)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig.model_validate({"scale": {"strategy": "replicate", "mixed_precision": "bf16"}})


def test_text_lr_scale_sets_the_text_paths_rate_and_only_its_rate() -> None:
    cfg = _cfg()
    cfg.optim.text_lr_scale = 4.0
    model = _model()
    optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
    rest, text = optim.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    text_names = {names[id(p)] for p in text["params"]}
    assert len(rest["params"]) + len(text["params"]) == len(names)  # every parameter, once
    expected = {
        n
        for n in names.values()
        if n.startswith(("refiners.", "collaborative.", "null_token", "text_pool.")) or ".cross_attn." in n
    }
    assert text_names == expected and "backbone.blocks.0.cross_attn.to_kv.weight" in text_names
    latents, texts = _batch(0, 3)
    train_step(model, optim, ema, latents, texts, cfg, 3, step_generator(0, 0, 3))
    assert text["lr"] == pytest.approx(4.0 * rest["lr"]) and rest["lr"] == pytest.approx(
        lr_at(3, STEPS, cfg.optim)
    )
    cfg.optim.text_lr_scale = 1.0  # the default: one group, one rate
    assert len(build_optimizer(model, cfg).param_groups) == 1


def test_step_returns_tensors_and_window_means_them() -> None:
    cfg, model = _cfg(), _model()
    optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
    window, seen = MetricWindow(), []
    for step in range(3):
        latents, texts = _batch(0, step)
        out = train_step(model, optim, ema, latents, texts, cfg, step, step_generator(0, 0, step))
        assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0 and not out.loss.requires_grad
        seen.append(out.loss.item())
        window.add(out)
    loss, grad_norm = window.reduce()
    assert loss == pytest.approx(sum(seen) / 3) and grad_norm > 0
    assert optim.param_groups[0]["lr"] < cfg.optim.lr  # cosine schedule past warmup
    assert window.reset() > 0 and window.steps == 0


def test_contrastive_term_pushes_conditioned_rows_from_other_targets() -> None:
    target = torch.tensor([[0.0], [1.0], [3.0]]).view(3, 1, 1, 1)
    pred = target.clone()  # perfect predictions: the distance to the previous row's target is what is left
    dropped = torch.tensor([False, False, True])
    # row 0 vs row 2's target (roll by one): 9, row 1 vs row 0's: 1; row 2 (text dropped) left out
    assert contrastive_term(pred, target, dropped).item() == pytest.approx((9 + 1) / 2)
    assert contrastive_term(pred, target, torch.ones(3, dtype=torch.bool)).item() == 0.0

    plain = _cfg()
    contrastive = plain.model_copy(
        update={"model": plain.model.model_copy(update={"contrastive_weight": 0.05})}, deep=True
    )
    grads, losses = [], []
    for cfg in (plain, contrastive):
        model = _model()
        optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
        latents, texts = _batch(0, 0)
        optim.step = lambda: None  # keep the gradients for the comparison  # noqa: E731
        optim.zero_grad = lambda set_to_none=True: None  # noqa: E731
        losses.append(train_step(model, optim, ema, latents, texts, cfg, 0, step_generator(0, 0, 0)).loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0].item() == pytest.approx(losses[1].item())  # the logged loss is the MSE in both
    assert not torch.allclose(grads[0], grads[1])  # the objective is not
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"model": {"contrastive_weight": 1.0}})


def test_hard_negative_hinge_stops_once_the_negative_misses_by_the_margin() -> None:
    target = torch.zeros(2, 1, 1, 1)
    pred = torch.tensor([1.0, 1.0]).view(2, 1, 1, 1)  # positive MSE 1 on both rows
    negative = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # MSE 1 (no better than the truth) and 4
    # row 0: relu(1.1 - 1) = 0.1; row 1: relu(1.1 - 4) = 0
    assert hard_negative_term(pred, negative, target, 0.1).item() == pytest.approx(0.05)
    assert hard_negative_term(pred, negative * 2, target, 0.1).item() == 0.0


def _hard_negative_cfg(weight: float, min_sigma: float = 0.0, max_sigma: float = 1.0) -> TrainConfig:
    plain = _cfg()
    update = {
        "hard_negative_weight": weight,
        "hard_negative_min_sigma": min_sigma,
        "hard_negative_max_sigma": max_sigma,
    }
    return plain.model_copy(update={"model": plain.model.model_copy(update=update)}, deep=True)


def _step_grads(
    cfg: TrainConfig,
    negatives: HardNegatives | None = None,
    layout: LayoutTargets | None = None,
    latents: torch.Tensor | None = None,
    **model_overrides: object,
) -> tuple[float, dict[str, torch.Tensor]]:
    """One step's logged loss and every parameter's gradient (optimizer step and zeroing stubbed out)."""
    model = _model(**model_overrides)
    optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
    random_latents, texts = _batch(0, 0)
    latents = random_latents if latents is None else latents
    optim.step = lambda: None  # keep the gradients for the comparison  # noqa: E731
    optim.zero_grad = lambda set_to_none=True: None  # noqa: E731
    out = train_step(
        model, optim, ema, latents, texts, cfg, 0, step_generator(0, 0, 0), None, negatives, layout
    )
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def test_hard_negatives_change_the_objective_not_the_logged_loss() -> None:
    _, texts = _batch(0, 1)  # another batch's text as row 1's negative caption
    negatives = HardNegatives(
        torch.tensor([1]), [TextFeatures(t.states[1:], t.mask[1:], t.prefix_len) for t in texts]
    )
    plain_loss, plain = _step_grads(_cfg())
    loss, grads = _step_grads(_hard_negative_cfg(1.0), negatives)
    assert loss == pytest.approx(plain_loss, rel=1e-5)  # the logged loss is the MSE in both
    assert not torch.allclose(_flat(grads), _flat(plain))
    # Off (weight 0) or every negative row below the noise floor: exactly the plain step.
    assert torch.equal(_flat(_step_grads(_hard_negative_cfg(0.0), negatives)[1]), _flat(plain))
    assert torch.equal(_flat(_step_grads(_hard_negative_cfg(1.0, min_sigma=1.0), negatives)[1]), _flat(plain))
    # ... or above the noise ceiling (row 1 draws a noise level above 0; the band [0, 0] holds none).
    assert torch.equal(_flat(_step_grads(_hard_negative_cfg(1.0, max_sigma=0.0), negatives)[1]), _flat(plain))


def _foreground_cfg(weight: float) -> TrainConfig:
    plain = _cfg()
    return plain.model_copy(update={"model": plain.model.model_copy(update={"foreground_weight": weight})})


def test_foreground_weight_changes_the_objective_not_the_logged_loss() -> None:
    scenes = torch.zeros(PER_RANK, 4, 8, 8)  # black canvases with one object each
    scenes[0, :, 1:4, 2:5] = 1.5
    scenes[1, :, 5:7, 4:8] = -2.0
    plain_loss, plain = _step_grads(_cfg(), latents=scenes)
    loss, grads = _step_grads(_foreground_cfg(4.0), latents=scenes)
    assert loss == pytest.approx(plain_loss, rel=1e-5)  # the logged loss is the plain MSE in both
    assert not torch.allclose(_flat(grads), _flat(plain))
    assert torch.equal(_flat(_step_grads(_foreground_cfg(0.0), latents=scenes)[1]), _flat(plain))
    # Beside the contrastive term the weighting still applies (the term is subtracted from the weighted MSE).
    both = {"foreground_weight": 4.0, "contrastive_weight": 0.05}
    contrastive = {"contrastive_weight": 0.05}
    plain_cfg = _cfg()
    with_both, with_contrastive = (
        plain_cfg.model_copy(update={"model": plain_cfg.model.model_copy(update=u)})
        for u in (both, contrastive)
    )
    assert not torch.allclose(
        _flat(_step_grads(with_both, latents=scenes)[1]),
        _flat(_step_grads(with_contrastive, latents=scenes)[1]),
    )
    # Nothing stands out from the background: uniform weights, the plain step up to rounding.
    flat_scenes = torch.full((PER_RANK, 4, 8, 8), 0.7)
    _, uniform = _step_grads(_foreground_cfg(4.0), latents=flat_scenes)
    assert torch.allclose(_flat(uniform), _flat(_step_grads(_cfg(), latents=flat_scenes)[1]), atol=1e-7)


def _layout_grads(weight: float, layout: LayoutTargets) -> tuple[float, dict[str, torch.Tensor]]:
    plain = _cfg()
    # No clipping: a clipped step rescales every gradient, the image path's too.
    update = {
        "model": plain.model.model_copy(update={"layout_weight": weight}),
        "optim": plain.optim.model_copy(update={"grad_clip": 1e9}),
    }
    return _step_grads(plain.model_copy(update=update, deep=True), None, layout, layout_head=True)


def _layout_targets(rows: int) -> LayoutTargets:
    """Targets on the second prompt token of the first `rows` rows, for both branches (4 prompt tokens each)."""
    targets, masks = [], []
    for _ in BRANCHES:
        target = torch.zeros(PER_RANK, 4, 2)
        mask = torch.zeros(PER_RANK, 4, dtype=torch.bool)
        target[:rows, 1] = torch.tensor([-1.0, 0.5])
        mask[:rows, 1] = True
        targets.append(target)
        masks.append(mask)
    return LayoutTargets(targets, masks)


def test_layout_supervision_trains_the_text_path_not_the_logged_loss() -> None:
    plain_loss, plain = _layout_grads(0.0, _layout_targets(PER_RANK))
    loss, grads = _layout_grads(0.5, _layout_targets(PER_RANK))
    assert loss == pytest.approx(plain_loss, rel=1e-5)  # the logged loss is the MSE in both
    assert not any(n.startswith("layout_head") for n in plain)  # off: the head is not even in the graph
    assert grads["layout_head.3.weight"].abs().sum() > 0
    refiner = [n for n in grads if n.startswith("refiners.")]
    assert any(not torch.allclose(grads[n], plain[n]) for n in refiner)  # it reaches the refiners
    backbone = [n for n in grads if n.startswith("backbone.")]
    assert all(torch.equal(grads[n], plain[n]) for n in backbone)  # and not the image path
    # No token with a target: exactly the plain step.
    _, none = _layout_grads(0.5, _layout_targets(0))
    assert all(torch.equal(none[n], plain[n]) for n in plain)


def test_layout_targets_stay_aligned_when_longer_negative_rows_re_pad_the_prompts() -> None:
    _, texts = _batch(0, 1)
    longer = []  # row 1's negative caption: its prompt tokens and 3 more, longer than any row of the batch
    for t in texts:
        states = torch.cat([t.states[1:], t.states[1:, -3:]], dim=1)
        longer.append(TextFeatures(states, torch.ones(states.shape[:2], dtype=torch.bool), t.prefix_len))
    negatives = HardNegatives(torch.tensor([1]), longer)
    cfg = _hard_negative_cfg(1.0)
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"layout_weight": 0.5}),
            "optim": cfg.optim.model_copy(update={"grad_clip": 1e9}),  # no clipping, as in `_layout_grads`
        }
    )
    loss, grads = _step_grads(cfg, negatives, _layout_targets(PER_RANK), layout_head=True)
    layout_loss, layout_only = _layout_grads(0.5, _layout_targets(PER_RANK))
    # The batch's own rows predict as before the re-padding.
    assert loss == pytest.approx(layout_loss, rel=1e-5)
    # The head reads only the prompt tokens and feeds only the layout term: same targets, same gradient.
    for name in (n for n in grads if n.startswith("layout_head")):
        torch.testing.assert_close(grads[name], layout_only[name], atol=1e-6, rtol=1e-4)
    assert not torch.allclose(_flat(grads), _flat(layout_only))  # and the hard negatives trained the rest


def test_compile_pads_the_text_and_keeps_the_step() -> None:
    """With `scale.compile` the model sees every branch's tokens padded to `scale.compile_text_multiple`
    (7 -> 8 here; the layout targets and a longer negative's 10 tokens -> 16 with them), masked out: the
    logged loss and every gradient are the unpadded step's."""
    _, texts = _batch(0, 1)
    longer = []  # row 1's negative caption, longer than the batch's rows, as in the re-padding test above
    for t in texts:
        states = torch.cat([t.states[1:], t.states[1:, -3:]], dim=1)
        longer.append(TextFeatures(states, torch.ones(states.shape[:2], dtype=torch.bool), t.prefix_len))
    negatives = HardNegatives(torch.tensor([1]), longer)
    plain = _hard_negative_cfg(1.0)
    update = {
        "model": plain.model.model_copy(update={"layout_weight": 0.5}),
        "optim": plain.optim.model_copy(update={"grad_clip": 1e9}),
    }
    plain = plain.model_copy(update=update)
    compiled = plain.model_copy(
        update={"scale": plain.scale.model_copy(update={"compile": True, "compile_text_multiple": 8})}
    )
    lengths: list[list[int]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, LiDiTGenerator):
            lengths.append([t.states.shape[1] for t in args[2]])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        loss, grads = _step_grads(compiled, negatives, _layout_targets(PER_RANK), layout_head=True)
        plain_loss, plain_grads = _step_grads(plain, negatives, _layout_targets(PER_RANK), layout_head=True)
    finally:
        handle.remove()
    assert lengths == [[16, 16], [10, 10]]  # batch and negative rows in one forward, padded vs not
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-4)


def test_layout_term_averages_target_tokens_of_kept_rows() -> None:
    layout = LayoutTargets(
        [torch.zeros(2, 3, 2)], [torch.tensor([[True, False, False], [True, True, False]])]
    )
    pred = torch.zeros(2, 3, 2)
    pred[0, 0] = torch.tensor([1.0, 1.0])  # squared error 2 on row 0's one target token
    pred[0, 1] = torch.tensor([5.0, 5.0])  # no target there: ignored
    assert layout_term(pred, layout, torch.tensor([True, True])).item() == pytest.approx(2 / 3)
    assert layout_term(pred, layout, torch.tensor([True, False])).item() == pytest.approx(2.0)
    assert layout_term(pred, layout, torch.tensor([False, False])).item() == 0.0  # CFG-dropped rows
    with pytest.raises(ValueError, match="do not match"):
        layout_term(torch.zeros(2, 4, 2), layout, torch.tensor([True, True]))
