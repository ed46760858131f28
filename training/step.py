"""The one generator train step, shared by the Ray Train loop, the benchmarks and Ray-free (GPU) checks.

Ray-free on purpose (torch + `lidit` + the pydantic config only), so a bare single-process loop and the
distributed loop time and train exactly the same code. Nothing here reads a tensor back to the host: the step
returns its loss and gradient norm as tensors, and `MetricWindow` turns a window of them into numbers with one
reduction when the loop logs. A per-step `.item()` (plus its all-reduce) would stall every step on the slowest
rank and, on GPU, drain the launch queue.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lidit.generator import HardNegatives, TextFeatures
from lidit.layout import LayoutTargets
from lidit.objectives import NUM_TRAIN_TIMESTEPS, cfg_drop_mask, foreground_weights, training_targets
from training.config import TrainConfig
from training.state import EMA, lr_at


class StepOutput(NamedTuple):
    """What one step leaves behind, still on the device: no host sync has happened."""

    loss: torch.Tensor  # () this rank's mean squared error, detached
    grad_norm: torch.Tensor  # () total gradient norm before clipping (a DTensor under FSDP2)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one step on one rank: noise, timesteps and CFG drops depend only on
    (seed, rank, step), so a resumed or restarted run draws exactly what an uninterrupted one does."""
    return torch.Generator().manual_seed(hash((seed, rank, step)) % (2**63))


# Parameter names (as `named_parameters` gives them, FSDP2 and replicas alike) of the path that carries the
# prompt into the generator; `optim.text_lr_scale` sets their learning rate relative to the rest.
TEXT_PATH = ("refiners.", "collaborative.", "null_token", "text_pool.", ".cross_attn.")


def optimizer_group_count(text_lr_scale: float) -> int:
    """How many AdamW parameter groups `parameter_groups` makes for this `optim.text_lr_scale`."""
    return 1 if text_lr_scale == 1.0 else 2


def parameter_groups(model: nn.Module, text_lr_scale: float) -> list[dict]:
    """One AdamW group per learning-rate scale: all parameters at scale 1, or the text path (`TEXT_PATH`) at
    `text_lr_scale` and the rest at 1. `train_step` sets each group's lr to the schedule's lr times its scale."""
    if optimizer_group_count(text_lr_scale) == 1:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    text, rest = [], []
    for name, param in model.named_parameters():
        (text if any(key in name for key in TEXT_PATH) else rest).append(param)
    if not text:
        raise ValueError("optim.text_lr_scale is set but the model has no text-path parameters")
    return [{"params": rest, "lr_scale": 1.0}, {"params": text, "lr_scale": text_lr_scale}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the (possibly sharded) parameters, with the kernels `optim.implementation` names.

    `auto` is fused on every device: one kernel reads and writes each parameter, gradient and moment once per
    step (the same weights as foreach, tests/training/test_step.py). On CPU (torch >= 2.4 has the fused CPU
    kernel) it took 2.9 ms a step against foreach's 11.1 for the `tiny` layout recipe's 235 tensors at one
    thread; torch's own default on CPU is neither but a loop over the parameters and a dozen ops each, every
    one through DTensor dispatch under FSDP2 (benchmarks/results/train_strategies.md, `+loop_adam`), hence
    pinned. `benchmarks/gpu_fsdp.py` times fused against foreach on a GPU.
    """
    kind = cfg.optim.implementation
    if kind == "auto":
        kind = "fused"
    return torch.optim.AdamW(
        parameter_groups(model, cfg.optim.text_lr_scale),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
        **{kind: True},
    )


def train_step(
    model: nn.Module,
    optim: torch.optim.Optimizer,
    ema: EMA,
    latents: torch.Tensor,
    texts: list[TextFeatures],
    cfg: TrainConfig,
    step: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    negatives: HardNegatives | None = None,
    layout: LayoutTargets | None = None,
) -> StepOutput:
    """One optimizer step on one batch: CFG dropout, noising, LR schedule, forward, MSE (weighted towards the
    objects when `model.foreground_weight` > 0; minus the contrastive term when `model.contrastive_weight` > 0,
    plus the hard-negative hinge and the layout term when given and weighted), backward, clip, AdamW, EMA. The
    returned loss is the plain MSE alone, so runs with and without the extra terms log comparable losses.

    `latents` (B, C, H, W) and `texts` (one `TextFeatures` per generator branch, in its order) arrive on the
    CPU from the loader; random draws use the CPU `generator` so they do not depend on the device, and inputs
    move to `device` (default: the latents' device) only afterwards. `step` is the 0-based index of this step
    (it sets the learning rate). Returns the loss and gradient norm as tensors: reading them is the caller's
    choice (see `MetricWindow`).
    """
    device = device or latents.device
    if cfg.scale.compile and cfg.scale.compile_text_multiple > 1:
        texts, negatives, layout = padded_for_compile(
            texts, negatives, layout, cfg.scale.compile_text_multiple
        )
    drop = cfg_drop_mask(latents.shape[0], cfg.cfg_drop_prob, generator)
    texts = [t.drop_prompt(drop).to(device) for t in texts]
    targets = training_targets(
        cfg.model.objective, latents, generator, cfg.model.flow_shift, cfg.model.timestep_sampling
    )
    lr = lr_at(step, cfg.steps, cfg.optim)
    for group in optim.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    noisy, timesteps = targets.noisy, targets.timesteps
    neg_rows = None
    if negatives is not None and cfg.model.hard_negative_weight > 0:
        level = timesteps[negatives.rows] / NUM_TRAIN_TIMESTEPS
        in_band = (level >= cfg.model.hard_negative_min_sigma) & (level <= cfg.model.hard_negative_max_sigma)
        keep = ~drop[negatives.rows] & in_band
        if keep.any():
            # One forward over the batch and its negative rows: the tiny model is bound by per-op overhead.
            neg_rows = negatives.rows[keep]
            noisy = torch.cat([noisy, noisy[neg_rows]])
            timesteps = torch.cat([timesteps, timesteps[neg_rows]])
            texts = [
                TextFeatures.cat([t, TextFeatures(n.states[keep], n.mask[keep], n.prefix_len).to(device)])
                for t, n in zip(texts, negatives.texts, strict=True)
            ]
    use_layout = layout is not None and cfg.model.layout_weight > 0
    if use_layout and neg_rows is not None:
        # Longer negative rows re-pad every row's prompt tokens: pad the targets with them, so they stay aligned.
        layout = layout.padded_to([t.states.shape[1] - t.prefix_len for t in texts])
    out = model(noisy.to(device), timesteps.to(device), texts, with_layout=use_layout)
    pred, layout_pred = out if use_layout else (out, None)
    pred = pred.float()  # (B [+ K], C, H, W)
    batch = latents.shape[0]
    pred, pred_neg = pred[:batch], pred[batch:]
    target = targets.target.to(device).float()
    loss = F.mse_loss(pred, target)
    objective = loss
    if cfg.model.foreground_weight > 0:
        weights = foreground_weights(latents.to(device).float(), cfg.model.foreground_weight)
        objective = (weights * (pred - target).square()).mean()
    if cfg.model.contrastive_weight > 0:
        objective = objective - cfg.model.contrastive_weight * contrastive_term(pred, target, drop.to(device))
    if neg_rows is not None:
        rows = neg_rows.to(device)
        term = hard_negative_term(pred[rows], pred_neg, target[rows], cfg.model.hard_negative_margin)
        objective = objective + cfg.model.hard_negative_weight * term
    if layout_pred is not None:
        term = layout_term(layout_pred[: latents.shape[0]].float(), layout, ~drop.to(device))
        objective = objective + cfg.model.layout_weight * term
    objective.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
    optim.step()
    optim.zero_grad(set_to_none=True)
    ema.update(model)
    return StepOutput(loss.detach(), grad_norm.detach())


def padded_for_compile(
    texts: list[TextFeatures],
    negatives: HardNegatives | None,
    layout: LayoutTargets | None,
    multiple: int,
) -> tuple[list[TextFeatures], HardNegatives | None, LayoutTargets | None]:
    """Every branch's tokens (the batch's and its negatives') padded to a multiple of `multiple`, the layout
    targets with them. A compiled block's backward specialises on the text length, so each new length in a
    batch recompiles the blocks, up to torch's recompile limit (8), and every later new length runs eager.
    Padded tokens are masked out: the same loss and gradients up to rounding."""
    texts = [t.padded_to_multiple(multiple) for t in texts]
    if layout is not None:
        layout = layout.padded_to([t.states.shape[1] - t.prefix_len for t in texts])
    if negatives is not None:
        negatives = HardNegatives(negatives.rows, [t.padded_to_multiple(multiple) for t in negatives.texts])
    return texts, negatives, layout


def contrastive_term(pred: torch.Tensor, target: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each text-conditioned prediction to the target of the next row in the batch
    (a row of other content and other text): contrastive flow matching subtracts it, times its weight, from
    the MSE, so a prediction that ignores the text (lands between the rows' targets) costs more. Rows whose
    text was dropped for CFG are left out: their prediction should be the average."""
    keep = (~dropped).float()  # (B,)
    if pred.shape[0] < 2 or keep.sum() == 0:
        return pred.new_zeros(())
    per_row = (pred - target.roll(1, dims=0)).square().flatten(1).mean(1)  # (B,)
    return (per_row * keep).sum() / keep.sum()


def hard_negative_term(
    pred: torch.Tensor, pred_negative: torch.Tensor, target: torch.Tensor, margin: float
) -> torch.Tensor:
    """Hinge on the per-row MSE under the true caption (`pred`) and under its negative (`pred_negative`), same
    noisy input and target: zero once the negative misses by `margin` (relative) more, so it stops pushing
    when the model tells the captions apart. Same-object, same-noise pairs differ only in the relation
    words, so what is learnt is where the words put each object, not which objects the image holds."""
    positive = (pred - target).square().flatten(1).mean(1)  # (K,)
    negative = (pred_negative - target).square().flatten(1).mean(1)
    return F.relu(positive * (1 + margin) - negative).mean()


def layout_term(pred: torch.Tensor, layout: LayoutTargets, kept: torch.Tensor) -> torch.Tensor:
    """Squared error of the layout head's (B, S, 2) per-token positions against the targets, averaged over
    the tokens that have one, in rows whose prompt was kept (a CFG-dropped row has no words to read)."""
    targets = torch.cat([t.to(pred.device) for t in layout.targets], dim=1)  # (B, S, 2)
    mask = torch.cat([m.to(pred.device) for m in layout.mask], dim=1) & kept.unsqueeze(1)  # (B, S)
    if targets.shape[:2] != pred.shape[:2]:
        raise ValueError(
            f"layout targets {tuple(targets.shape[:2])} do not match the prompt tokens {tuple(pred.shape[:2])}"
        )
    weight = mask.float()
    return ((pred - targets).square().sum(-1) * weight).sum() / weight.sum().clamp(min=1)


class MetricWindow:
    """Step outputs between two logs, kept as device tensors; `reduce` reads them with one collective.

    The loss is summed on the device, so a window of any length costs one all-reduce and one host read.
    `reduce` is a collective when a process group is up: every rank must call it at the same steps.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, out: StepOutput) -> None:
        self.loss_sum = out.loss if self.loss_sum is None else self.loss_sum + out.loss
        self.grad_norm = out.grad_norm
        self.steps += 1

    def reduce(self) -> tuple[float, float]:
        """(mean loss over the window and the ranks, last step's gradient norm); the window is kept."""
        if self.loss_sum is None or self.grad_norm is None:
            raise ValueError("empty metric window")
        norm = self.grad_norm
        if isinstance(norm, DTensor):  # FSDP2: a no-op for a replicated norm, a reduction for a partial one
            norm = norm.full_tensor()
        stats = torch.stack([self.loss_sum / self.steps, norm.float()])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            # Replicas' grad norms are equal after the gradient all-reduce, so averaging leaves them unchanged.
            dist.all_reduce(stats)
            stats = stats / world
        loss, grad_norm = stats.tolist()
        return loss, grad_norm

    def reset(self) -> float:
        """Start a new window; returns the seconds the closed one took (read after `reduce` synced)."""
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        self.loss_sum, self.grad_norm, self.steps = None, None, 0
        return elapsed
