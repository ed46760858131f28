"""The typed messages of a cache build: what the planner sends the workers and what they send back.

`BuildSpec` is shared by every unit of one build (sent once, by reference); `UnitTask` is one unit of source rows
to compute; `ShardResult` is all a worker returns after writing a unit's shard: its manifest entry and counts.
No rows, ids or tensors travel through the driver.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lidit.cache import contract as C
from lidit.config import StrictModel
from pipelines.sources import SourceConfig


class EncoderSpec(StrictModel):
    """What decode tasks need of an encoder: where its tokenizer is, and the prompt-token limit."""

    name: str
    path: str
    max_length: int = Field(gt=0)


class BuildSpec(StrictModel):
    """Settings every unit of one build shares."""

    output_uri: str
    storage_options: dict = Field(default_factory=dict)
    image: C.ImageSettings
    encoders: list[EncoderSpec] = Field(min_length=1, description="in manifest order")
    groups: dict[str, str] = Field(description="column group -> fingerprint, in output order")
    layout: bool = Field(False, description="encoder groups also hold the layout targets")
    negatives: bool = Field(False, description="encoder groups also hold the negative captions' states")

    @property
    def encoder_names(self) -> list[str]:
        return [e.name for e in self.encoders]


class RowRange(StrictModel):
    """A contiguous range of rows of one source file (Parquet, tar) or image folder listing."""

    source: SourceConfig
    source_uri: str = Field(description="URI of the source file (Parquet, tar) or image folder")
    format: Literal["parquet", "images", "webdataset"]
    path: str = Field(description="filesystem path of source_uri")
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    files: list[tuple[str, str | None]] = Field(
        default_factory=list, description="image folders: (image path, caption path) per row"
    )
    seek: tuple[int, int] | None = Field(
        None,
        description="tars: (sample number, header offset) at or before start, where the header walk begins",
    )

    @property
    def rows(self) -> int:
        return self.stop - self.start


class UnitTask(RowRange):
    """One unit of source rows to compute into a shard."""

    unit: str = Field(description="content key of the unit (source content, range, settings, duplicates)")
    name: str = Field(description="shard file stem: <unit>-<groups key>")
    dup: list[int] = Field(default_factory=list, description="row offsets (in the unit) of duplicate ids")
    need: list[str] = Field(description="column groups whose stage runs (on rows not reused)")
    reuse_groups: list[str] = Field(default_factory=list, description="groups taken from `reuse_path` by id")
    reuse_path: str | None = Field(None, description="filesystem path of the previous shard of this unit")


class ShardResult(StrictModel):
    """What a worker returns for a written unit: the shard's manifest entry and rows computed per group."""

    entry: C.ShardEntry
    computed: dict[str, int]
