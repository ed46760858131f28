"""Meta-device construction (training.parallelize.build_parallel / init_weights), Ray-free on CPU.

- Two gloo ranks build the generator on meta, shard it (FSDP2) or replicate it, `to_empty`, initialise: the
  gathered weights equal an eager model given the same `init_weights` call, bit for bit, on both ranks.
- The rule is the generator's own (`initialize_weights`): same zeros, ones and spreads as an eager build.
- Peak memory at init, one process of a world of 8 (torch's fake process group): the meta path stays a small
  fraction of the full model, an eager build does not.
- The EMA export: the full weights on rank 0 only, on the CPU; another rank's peak during the export is one
  parameter, not the model (an every-rank gather, the old export, is measured beside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec
from tests.ports import free_port
from training.parallelize import build_parallel, init_weights
from training.state import EMA, full_model_state

BRANCHES = [
    TextBranchSpec(name="a", hidden_size=24),
    TextBranchSpec(name="b", hidden_size=16),
]
# Every optional part on (layout head and attention, conv stem and head), so each kind of parameter is materialised from meta.
CONFIG = GeneratorConfig.from_preset(
    "tiny",
    BRANCHES,
    dim=32,
    depth=2,
    heads=2,
    refiner_depth=1,
    layout_head=True,
    layout_attention=True,
    conv_channels=8,
)
SEED = 5
REPO = Path(__file__).resolve().parents[2]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for strategy in ("fsdp", "replicate"):
        model = build_parallel(CONFIG, mesh, torch.device("cpu"), SEED, strategy)
        local = {n: p.to_local().clone() for n, p in model.named_parameters() if hasattr(p, "to_local")}
        ema = EMA(model, 0.9)
        results[strategy] = {
            "full": full_model_state(model),
            "local": local,
            "ema": ema.full_state_dict(),
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("meta_ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _eager_reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # whatever the constructor drew is overwritten
    return init_weights(LiDiTGenerator(CONFIG), CONFIG, SEED).state_dict()


@pytest.mark.parametrize("strategy", ["fsdp", "replicate"])
def test_sharded_init_equals_eager_on_every_rank(ranks: list[dict], strategy: str) -> None:
    reference = _eager_reference()
    for rank in ranks:
        full = rank[strategy]["full"]
        assert full.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(full[key], value), (strategy, key)


@pytest.mark.parametrize("strategy", ["fsdp", "replicate"])
def test_ema_export_is_on_rank_0_only(ranks: list[dict], strategy: str) -> None:
    reference = _eager_reference()
    exported, other = ranks[0][strategy]["ema"], ranks[1][strategy]["ema"]
    assert other == {}
    assert exported.keys() == dict(LiDiTGenerator(CONFIG).named_parameters()).keys()
    for key, value in exported.items():
        assert value.device.type == "cpu" and value.dtype == torch.float32
        assert torch.equal(value, reference[key]), key  # EMA starts at the initial weights


def test_fsdp_ranks_hold_different_halves(ranks: list[dict]) -> None:
    """Each rank's shard is its own part of the one full tensor (not the same draws repeated per rank)."""
    reference = _eager_reference()
    key = "backbone.blocks.0.mlp.fc1.weight"
    a, b = ranks[0]["fsdp"]["local"][key], ranks[1]["fsdp"]["local"][key]
    assert a.shape[0] + b.shape[0] == reference[key].shape[0]
    assert torch.equal(torch.cat([a, b]), reference[key]) and not torch.equal(a, b)


def test_init_follows_the_generators_own_rule() -> None:
    """Same zeros (adaLN-Zero, biases), ones (norms) and spreads as `torch.manual_seed(s); LiDiTGenerator(c)`;
    other numbers (a per-unit stream, not one stream over the whole model); the global RNG is left alone."""
    torch.manual_seed(SEED)
    eager = LiDiTGenerator(CONFIG).state_dict()
    ours = _eager_reference()
    model = LiDiTGenerator(CONFIG)
    before = torch.get_rng_state()
    init_weights(model, CONFIG, SEED)
    assert torch.equal(torch.get_rng_state(), before)
    random = 0
    for key, e in eager.items():
        o = ours[key]
        assert bool((o == 0).all()) == bool((e == 0).all()), key
        assert bool((o == 1).all()) == bool((e == 1).all()), key
        if e.numel() >= 1000 and e.std() > 0:
            random += 1
            assert 0.85 < float(o.std() / e.std()) < 1.15, key
            assert not torch.equal(o, e), key
    assert random >= 10
    other = init_weights(LiDiTGenerator(CONFIG), CONFIG, SEED + 1).state_dict()
    assert not torch.equal(
        other["backbone.blocks.0.mlp.fc1.weight"],
        ours["backbone.blocks.0.mlp.fc1.weight"],
    )


MEMORY_SCRIPT = """
import json, re, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec
from training.parallelize import build_parallel
from training.state import EMA

def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

def peak_of(fn):
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    out = fn()
    return out, status("VmHWM") - before

torch.set_num_threads(1)
world, rank = 8, int(sys.argv[2])
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)  # one rank of 8, no peers
cfg = GeneratorConfig.from_preset(sys.argv[1], [TextBranchSpec(name=n, hidden_size=64) for n in "ab"])
mesh = init_device_mesh("cpu", (world,))
model, meta_peak = peak_of(lambda: build_parallel(cfg, mesh, torch.device("cpu"), 0, "fsdp"))
full = sum(p.numel() * p.element_size() for p in model.parameters())
local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() * p.element_size() for p in model.parameters())
ema = EMA(model, 0.9)
exported, export_peak = peak_of(ema.full_state_dict)
everywhere, gather_peak = peak_of(lambda: {n: t.full_tensor() for n, t in ema.shadow.items()})  # the old export
del model, ema, everywhere
torch.manual_seed(0)
_, eager_peak = peak_of(lambda: LiDiTGenerator(cfg))
print(json.dumps({"world": world, "rank": rank, "full": full, "local": local, "largest": largest,
    "meta_peak": meta_peak, "eager_peak": eager_peak, "export_peak": export_peak, "gather_peak": gather_peak,
    "exported": len(exported)}))
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux /proc peak-RSS reset",
)
def test_peak_memory_of_meta_init_and_export_on_another_rank() -> None:
    """Preset S (about 56M parameters, 225 MB fp32) as rank 1 of 8: the meta path's init peak is its shards
    plus one block, an eager build's is the whole model; the EMA export's peak is about one parameter there
    (rank 0 keeps the weights), the old every-rank gather's the whole model. A fresh process, peaks reset."""
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, "S", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        # Every tensor-sized block mmapped and unmapped on free: no freed heap memory hides a later peak.
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({k: round(v / 2**20, 1) if v > 2**16 else v for k, v in m.items()}))
    assert m["full"] > 150 * 2**20  # large enough to see
    assert abs(m["local"] - m["full"] / m["world"]) < 0.02 * m["full"]  # this rank holds 1/8
    assert m["eager_peak"] > 0.9 * m["full"]  # the measurement sees a full build
    assert m["meta_peak"] < 0.35 * m["full"], m  # shards (1/8) + one block, not the model
    assert m["exported"] == 0  # rank 1 keeps nothing
    assert m["gather_peak"] > 0.9 * m["full"]  # an every-rank gather materialises the model here
    assert m["export_peak"] < 2 * m["largest"] + 0.05 * m["full"], m  # one parameter at a time
