"""Prototype, measured once: align a DiT block's tokens with the starter's ground-truth colour x shape per token.

    python benchmarks/prototypes/semantic_alignment.py --recipe NAME --config configs/starter/train.yaml \
        --budgets 1200,2400 [--align-weight 0.25 --align-block 1] [learning_curve.py options]

The idea is REPA's (representation alignment, Yu et al. 2024: a DiT trains several times faster when a
projection of an early block's tokens is made to match a pretrained image encoder's features of the clean
image), with the starter's exact ground truth in place of the encoder: for every generator token (8 x 8 px at
the starter's 4x VAE and patch 2) the share of its pixels covered by each (colour, shape) class or the
background, 25 classes, drawn from the scene spec. An MLP on block `--align-block`'s output predicts that
distribution; its cross-entropy, times `--align-weight`, joins the objective at every noise level.

Not a platform feature: the term enters through a forward hook on the real run of `learning_curve.py` (its
train step, loader, EMA and evaluation, rows written to its results under `--recipe`), so the numbers are the
project's own code path plus this one term. Kept so the measurement can be rerun; results and what they say:
`benchmarks/results/learning_curve.md`, recipes `default-align` and `grid8-conv32-shn-align-4k`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import benchmarks.learning_curve as curve  # noqa: E402
from lidit.config import lidit_home  # noqa: E402
from lidit.starter import iter_split  # noqa: E402
from lidit.starter.render import draw_shape  # noqa: E402
from lidit.starter.scenes import COLOURS, SHAPES  # noqa: E402

CLASSES = 1 + len(COLOURS) * len(SHAPES)  # background + every (colour, shape)
TOKEN_PX = 8  # pixels per generator token side: 4x VAE, patch 2


class AddToObjective(torch.autograd.Function):
    """Identity on `tokens`; in backward, `term` receives gradient 1: the term joins whatever loss the tokens
    feed, without touching the step that computes it."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=grad.dtype)


def class_shares(spec: dict[str, Any]) -> torch.Tensor:
    """(tokens, CLASSES): per generator token, the share of its pixels in each class (row-major tokens)."""
    size = int(spec["image_size"])
    labels = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(labels)
    colours = list(COLOURS)
    for obj in spec["objects"]:
        cls = 1 + colours.index(obj["colour"]) * len(SHAPES) + SHAPES.index(obj["shape"])
        for box in obj["boxes"]:
            draw_shape(draw, obj["shape"], tuple(box), cls)
    onehot = F.one_hot(torch.from_numpy(np.asarray(labels, dtype=np.int64)), CLASSES).float()
    side = size // TOKEN_PX
    return onehot.view(side, TOKEN_PX, side, TOKEN_PX, CLASSES).mean(dim=(1, 3)).reshape(-1, CLASSES)


def install(weight: float, block: int, starter: Path) -> None:
    """Patch `learning_curve`'s loader, optimizer builder and step so its run trains with the term."""
    # Scene specs by id (the cache keeps the starter's ids), read by the starter's own reader.
    specs = {row["id"]: row["spec"] for row in iter_split(starter, "train", decode=False)}
    shares = functools.lru_cache(maxsize=None)(lambda row_id: class_shares(specs[row_id]))
    state: dict[str, Any] = {"ids": None, "head": None, "terms": []}

    def hook(module: nn.Module, inputs: Any, tokens: torch.Tensor) -> torch.Tensor:
        if state["ids"] is None or not module.training:
            return tokens
        target = torch.stack([shares(i) for i in state["ids"]])  # (B, N, K)
        logits = state["head"](tokens[: target.shape[0]])  # the batch's rows, not its hard negatives
        term = -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()
        state["terms"].append(term.item())
        return AddToObjective.apply(tokens, weight * term)

    real_batches, real_optimizer, real_step = curve.bucketed_batches, curve.build_optimizer, curve.train_step

    def batches(*args: Any, **kwargs: Any) -> Any:
        for batch in real_batches(*args, **kwargs):
            state["ids"] = batch.ids
            yield batch

    def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        dim = model.backbone.blocks[0].norm1.normalized_shape[0]
        state["head"] = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, CLASSES))
        model.backbone.blocks[block].register_forward_hook(hook)
        optim = real_optimizer(model, cfg)
        optim.add_param_group(
            {"params": list(state["head"].parameters()), "weight_decay": 0.0, "lr_scale": 1.0}
        )
        return optim

    def step(*args: Any, **kwargs: Any) -> Any:
        out = real_step(*args, **kwargs)
        if len(state["terms"]) >= curve.PROGRESS_EVERY:
            print(f"[align] cross-entropy {sum(state['terms']) / len(state['terms']):.4f}", flush=True)
            state["terms"].clear()
        return out

    curve.bucketed_batches, curve.build_optimizer, curve.train_step = batches, build_optimizer, step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--align-weight", type=float, default=0.25)
    parser.add_argument(
        "--align-block", type=int, default=1, help="index of the block whose output is aligned"
    )
    parser.add_argument("--starter", default=str(lidit_home() / "starter"))
    args, rest = parser.parse_known_args()
    install(args.align_weight, args.align_block, Path(args.starter))
    sys.argv = [sys.argv[0], "--starter", args.starter, *rest]
    curve.main()


if __name__ == "__main__":
    main()
