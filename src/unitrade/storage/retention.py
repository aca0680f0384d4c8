"""How far a cell copy may trim its changelog, and the trim itself, one batch at a time.

A copy keeps its newest `positions_kept` positions and every row younger than `age_s` (on
the owner's clock: `created_ms` is copied verbatim). At the owner, older rows go only once
every follower has applied them, as the owner learns from their pulls; a replica has no
followers, and keeps what the same rules keep so that a switchover that makes it the owner
still finds recent positions for the others to pull. Whatever a follower's state, no copy
holds more than `positions_max` rows: past that it trims anyway, and a follower behind
that point is answered `changelog_trimmed` and rebuilds its copy from a snapshot.

A trim deletes from the bottom only, so a copy's changelog is always the gapless positions
(trimmed_position, last_position]. The trim is local to the copy and never captured.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, select, update

from unitrade.storage.schema import cell_meta, changelog
from unitrade.storage.store import WriteTx
from unitrade.topology.config import ChangelogPolicy

_META = select(cell_meta.c.last_position, cell_meta.c.trimmed_position)
# The oldest row of a range that is still too young to go (a range scan of the primary key
# over at most one batch: no index on created_ms, which would cost every write).
_FIRST_YOUNG = select(func.min(changelog.c.position)).where(
    changelog.c.position > bindparam("lo"),
    changelog.c.position <= bindparam("hi"),
    changelog.c.created_ms >= bindparam("cutoff_ms"),
)
_DELETE_THROUGH = delete(changelog).where(changelog.c.position <= bindparam("hi"))
_SET_TRIMMED = (
    update(cell_meta)
    .where(cell_meta.c.trimmed_position < bindparam("hi"))
    .values(trimmed_position=bindparam("hi"))
)


@dataclass(frozen=True)
class TrimTargets:
    """`soft`: how far the keep rule and the followers allow, before the age rule; `hard`:
    how far the copy must go to hold at most `positions_max` rows, whatever else says."""

    soft: int
    hard: int


def trim_targets(last: int, policy: ChangelogPolicy, followers_min: int | None) -> TrimTargets:
    """The trim targets of a copy at position `last`. `followers_min`: the lowest position
    a follower has applied, at the owner (0 if a follower is not known yet); None at a
    replica, which nobody pulls from."""
    soft = last - policy.positions_kept
    if followers_min is not None:
        soft = min(soft, followers_min)
    hard = last - policy.positions_max
    return TrimTargets(max(0, soft), max(0, hard))


def batch_end(trimmed: int, targets: TrimTargets, batch_rows: int, first_young: int | None) -> int:
    """Where one batch after `trimmed` ends: at most `batch_rows` rows, not past the soft
    target nor before the first young row unless the hard target says so."""
    end = min(trimmed + batch_rows, max(targets.soft, targets.hard, trimmed))
    if first_young is not None and first_young <= end:
        end = max(first_young - 1, min(targets.hard, end), trimmed)
    return end


def trim_batch(
    tx: WriteTx, policy: ChangelogPolicy, followers_min: int | None, cutoff_ms: int, rows: int
) -> int:
    """Delete one batch of this copy's changelog; the copy's trim point after it (equal to
    the one before when there is nothing to trim). Targets are computed in the transaction,
    from the copy's own position, so a concurrent apply or bootstrap cannot be overtaken."""
    (meta,) = tx.all(_META)
    last, trimmed = int(meta.last_position), int(meta.trimmed_position)
    targets = trim_targets(last, policy, followers_min)
    end = batch_end(trimmed, targets, rows, None)
    if end <= trimmed:
        return trimmed
    first_young = tx.one(_FIRST_YOUNG, {"lo": trimmed, "hi": end, "cutoff_ms": cutoff_ms})
    young = None if first_young is None or first_young[0] is None else int(first_young[0])
    end = batch_end(trimmed, targets, rows, young)
    if end <= trimmed:
        return trimmed
    tx.count(_DELETE_THROUGH, {"hi": end})
    tx.count(_SET_TRIMMED, {"hi": end})
    return end
