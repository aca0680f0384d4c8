"""Bodies of the replication calls between regions (pull, snapshot, wait). Unknown fields
are refused."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PullCall(_Body):
    cell: int
    after: Annotated[int, Field(ge=0)]
    limit: Annotated[int, Field(ge=1, le=500)]
    wait_ms: Annotated[int, Field(ge=0, le=2000)]
    region: Annotated[str | None, Field(max_length=16)] = None  # the follower
    rule_version: Annotated[int, Field(ge=0)] = 0  # the rule the follower acts under


class PullCellCall(_Body):
    cell: int
    after: Annotated[int, Field(ge=0)]


class PullManyCall(_Body):
    """A multiplexed pull: every cell a follower follows from this owner, one long poll."""

    cells: Annotated[list[PullCellCall], Field(min_length=1, max_length=64)]
    limit: Annotated[int, Field(ge=1, le=1000)]  # rows per cell; the owner caps the total too
    wait_ms: Annotated[int, Field(ge=0, le=2000)]
    region: Annotated[str | None, Field(max_length=16)] = None  # the follower
    rule_version: Annotated[int, Field(ge=0)] = 0  # the rule the follower acts under


class StreamCall(_Body):
    """A replication stream: every cell a follower follows from this owner, its positions
    acknowledged by opening it (replication/stream.py)."""

    cells: Annotated[list[PullCellCall], Field(min_length=1, max_length=64)]
    limit: Annotated[int, Field(ge=1, le=1000)]  # rows per cell per frame; the owner caps the total
    duration_ms: Annotated[int, Field(ge=0, le=5000)]  # the owner ends the stream after this
    region: Annotated[str, Field(max_length=16)]  # the follower
    rule_version: Annotated[int, Field(ge=0)] = 0  # the rule the follower acts under


class WaitCall(_Body):
    cell: int
    position: Annotated[int, Field(ge=0)]
    timeout_ms: Annotated[int, Field(ge=0, le=60_000)]


class SnapshotCall(_Body):
    cell: int
    table: Annotated[str | None, Field(pattern=r"^[a-z_]{1,64}$")] = None
    after: Annotated[list[int | str] | None, Field(max_length=8)] = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 1000
    upto: Annotated[int, Field(ge=0)] = 0
