"""Resume from a DCP checkpoint in the run's storage, each rank reading only its own shards.

`ray.train.Checkpoint.as_directory()` downloads the whole checkpoint (every rank's files) to every worker: at
10B that is the full model and optimizer state on each node. DCP needs none of that: given a storage reader on
the checkpoint's location, each rank reads the byte ranges of the tensors it holds (its FSDP shards) straight
from storage. Local (or shared) storage is read with DCP's `FileSystemReader`; object storage through fsspec
(`FsspecReader` on `s3://...`, the same bucket Ray Train writes to through pyarrow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, StorageReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from training.state import EMA


def storage_reader(path: str, filesystem: Any) -> StorageReader:
    """A DCP reader on `path` of `filesystem` (a `pyarrow.fs.FileSystem`, as `ray.train.Checkpoint` has)."""
    import pyarrow.fs

    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(f"{filesystem.type_name}://{path}")


def training_state(model: Any, optim: Any, ema: EMA, train_state: torch.Tensor) -> dict[str, Any]:
    """The state DCP saves and loads: model, optimizer, EMA (sharded like the model), step/epoch/position."""
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict(), "train": train_state}


def load_training_state(
    model: Any, optim: Any, ema: EMA, train_state: torch.Tensor, reader: StorageReader
) -> None:
    """Load every part in place (a collective: every rank calls it); each rank reads only what it holds.

    The optimizer's parameter groups (one, or two with `optim.text_lr_scale`) must be the checkpoint's; each
    group's rate scale stays the config's, as the learning rate itself does (`train_step` recomputes it)."""
    check_param_groups(reader, len(optim.param_groups))
    scales = [group.get("lr_scale", 1.0) for group in optim.param_groups]
    state = training_state(model, optim, ema, train_state)
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, scale in zip(optim.param_groups, scales, strict=True):
        group["lr_scale"] = scale


class CheckpointMismatchError(ValueError):
    """A checkpoint that this run's config cannot resume."""


def saved_param_groups(reader: StorageReader) -> int:
    """How many optimizer parameter groups a DCP training checkpoint holds (from its metadata alone)."""
    keys = reader.read_metadata().state_dict_metadata
    return len({key.split(".")[2] for key in keys if key.startswith("optim.param_groups.")})


def check_param_groups(reader: StorageReader, groups: int) -> None:
    """Raise `CheckpointMismatchError` unless the checkpoint's optimizer has `groups` parameter groups."""
    saved = saved_param_groups(reader)
    if saved != groups:
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer has {saved} parameter group(s), this config's has {groups} "
            "(optim.text_lr_scale 1 makes one, any other value two): resume with the text_lr_scale it was "
            "trained with, or change `name` for a fresh run"
        )


# Ray Train V2 records its checkpoints in this file of the run's folder; the run resumes from the latest.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class LatestCheckpoint:
    """The checkpoint Ray Train resumes a run from: where it is and the step it was saved at."""

    path: str
    filesystem: Any  # pyarrow.fs.FileSystem
    step: int | None

    def reader(self) -> StorageReader:
        return storage_reader(self.path, self.filesystem)


def latest_checkpoint(storage_path: str, name: str) -> LatestCheckpoint | None:
    """The checkpoint Ray Train resumes run `name` from (its own record in the run's folder), or None.

    Read on the driver before Ray starts: a checkpoint the config cannot load fails once, as a config error,
    instead of in every worker `checkpoint.max_failures` times over, and a finished run is not started again.
    The storage is resolved as Ray Train resolves `storage_path` (pyarrow's `FileSystem.from_uri`: a local path
    or `s3://...`)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    run_dir = f"{root}/{name}"
    try:
        with filesystem.open_input_stream(f"{run_dir}/{RAY_CHECKPOINT_SNAPSHOT}") as stream:
            snapshot = json.loads(stream.read())
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    if not latest.get("checkpoint_dir_name"):
        return None
    step = (latest.get("metrics") or {}).get("step")
    return LatestCheckpoint(f"{run_dir}/{latest['checkpoint_dir_name']}", filesystem, step)
