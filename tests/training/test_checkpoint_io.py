"""Resume reads each rank's own shards from the checkpoint in storage (no whole-checkpoint copy per worker).

Two gloo ranks (FSDP2, Ray-free) save model + AdamW + EMA with DCP as training does, then load into a
model initialised from another seed through `training.checkpoint`: every tensor comes back exactly, and
each rank reads about half of the checkpoint's bytes (its shards), not all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import init_device_mesh

from tests.ports import free_port
from tests.training.test_meta_init import CONFIG
from training.checkpoint import load_training_state, storage_reader, training_state
from training.parallelize import build_parallel
from training.state import EMA


class CountingReader(FileSystemReader):
    """FileSystemReader that adds up the bytes this rank's load plan reads from storage."""

    bytes_read = 0

    def read_data(self, plan, planner):  # noqa: ANN001, ANN201 (DCP's signature)
        self.bytes_read += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return super().read_data(plan, planner)


def _locals(model: torch.nn.Module, optim: torch.optim.Optimizer, ema: EMA) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p.to_local().clone() for n, p in model.named_parameters()}
    out.update({f"ema.{n}": t.to_local().clone() for n, t in ema.shadow.items()})
    for i, st in enumerate(optim.state.values()):
        out.update({f"optim.{i}.{k}": v.to_local().clone() for k, v in st.items() if hasattr(v, "to_local")})
    return out


def _build(mesh, seed: int):  # noqa: ANN001, ANN202
    model = build_parallel(CONFIG, mesh, torch.device("cpu"), seed, "fsdp")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optim, EMA(model, 0.9)


def _step(model: torch.nn.Module, optim: torch.optim.Optimizer, scale: float = 1.0) -> None:
    for i, p in enumerate(model.parameters()):
        p.grad = torch.ones_like(p) * (scale * (i + 1))
    optim.step()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    ckpt = Path(out) / "step_000001"
    model, optim, ema = _build(mesh, seed=1)
    _step(model, optim)  # optimizer state exists and is sharded like the model
    ema.update(model)
    dcp.save(training_state(model, optim, ema, torch.tensor([1, 0, 8])), checkpoint_id=str(ckpt))
    saved = _locals(model, optim, ema)

    import pyarrow.fs

    assert isinstance(storage_reader(str(ckpt), pyarrow.fs.LocalFileSystem()), FileSystemReader)
    fresh, fresh_optim, fresh_ema = _build(mesh, seed=2)
    _step(fresh, fresh_optim, scale=-1.0)
    train_state = torch.zeros(3, dtype=torch.long)
    reader = CountingReader(str(ckpt))
    load_training_state(fresh, fresh_optim, fresh_ema, train_state, reader)
    torch.save(
        {
            "saved": saved,
            "loaded": _locals(fresh, fresh_optim, fresh_ema),
            "train": train_state,
            "bytes_read": reader.bytes_read,
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], int]:
    out = tmp_path_factory.mktemp("ckpt_ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    total = sum(f.stat().st_size for f in (out / "step_000001").glob("*.distcp"))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], total


def test_each_rank_loads_its_own_shards_exactly(ranks: tuple[list[dict], int]) -> None:
    results, _ = ranks
    for r in results:
        assert r["saved"].keys() == r["loaded"].keys() and len(r["saved"]) > 3
        for key, value in r["saved"].items():
            torch.testing.assert_close(r["loaded"][key], value, rtol=0, atol=0, msg=key)
        assert r["train"].tolist() == [1, 0, 8]


def test_each_rank_reads_about_half_of_the_checkpoint(ranks: tuple[list[dict], int]) -> None:
    results, total = ranks
    read = [r["bytes_read"] for r in results]
    # Each rank's shards are half of every sharded tensor (+ the tiny replicated train state): a rank that
    # downloaded or read the whole checkpoint would read `total`.
    assert all(0.4 * total < b < 0.6 * total for b in read), (read, total)


def test_resume_keeps_the_configs_rate_scales_and_refuses_another_group_layout(tmp_path: Path) -> None:
    """A checkpoint of a one-rate run cannot resume with two rates (nor the reverse): one clear error, not
    DCP's missing-key traceback; with the same layout the config's scale wins over the checkpoint's."""
    from tests.training.test_step import _batch, _cfg, _model
    from training.checkpoint import CheckpointMismatchError
    from training.step import build_optimizer, step_generator, train_step

    def run(scale: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
        cfg = _cfg()
        cfg.optim.text_lr_scale = scale
        model = _model()
        optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
        latents, texts = _batch(0, 0)
        train_step(model, optim, ema, latents, texts, cfg, 0, step_generator(0, 0, 0))
        return model, optim, ema

    for saved_scale, resumed_scale in ((1.0, 0.25), (0.25, 1.0)):
        ckpt = tmp_path / f"from_{saved_scale}"
        dcp.save(training_state(*run(saved_scale), torch.zeros(3, dtype=torch.long)), checkpoint_id=str(ckpt))
        with pytest.raises(
            CheckpointMismatchError, match="resume with the text_lr_scale it was trained with"
        ):
            load_training_state(
                *run(resumed_scale), torch.zeros(3, dtype=torch.long), FileSystemReader(str(ckpt))
            )

    model, optim, ema = run(0.5)
    train_state = torch.zeros(3, dtype=torch.long)
    load_training_state(model, optim, ema, train_state, FileSystemReader(str(tmp_path / "from_0.25")))
    assert [group["lr_scale"] for group in optim.param_groups] == [1.0, 0.5]
