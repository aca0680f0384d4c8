"""Comparisons of a composite primary key with a bound key, for keyset pages (snapshots,
diff): `(a, b) > (:a, :b)` in key order.

SQLite and PostgreSQL scan a row-value comparison as a range of the primary key. MariaDB
does not: it reads the key from its start and filters, so the k-th page of a table read
k pages of rows, and a snapshot or a diff of a large table took quadratic time. On MySQL
and MariaDB the comparison is therefore spelled out, with a bound on the first column that
the range optimizer scans from:

    a >= :a AND (a > :a OR (a = :a AND b > :b))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, tuple_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import Boolean

AFTER = ">"
UP_TO = "<="


class KeyCompare(ColumnElement[bool]):
    """`columns` after (`>`) or up to (`<=`) `bounds`, in the order of the columns."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True  # a comparison: never rendered as `... = 1`
    _traverse_internals = [  # noqa: RUF012  # SQLAlchemy's cache key reads them
        ("columns", InternalTraversal.dp_clauseelement_list),
        ("bounds", InternalTraversal.dp_clauseelement_list),
        ("comparison", InternalTraversal.dp_string),
    ]

    def __init__(
        self, columns: Sequence[ColumnElement[Any]], bounds: Sequence[ColumnElement[Any]], op: str
    ) -> None:
        assert op in (AFTER, UP_TO) and len(columns) == len(bounds) >= 2
        self.columns = list(columns)
        self.bounds = list(bounds)
        self.comparison = op

    def row_value(self) -> ColumnElement[bool]:
        left, right = tuple_(*self.columns), tuple_(*self.bounds)
        return left > right if self.comparison == AFTER else left <= right

    def spelled_out(self) -> ColumnElement[bool]:
        strict = []  # the key differs first at column i
        for i, (column, bound) in enumerate(zip(self.columns, self.bounds, strict=True)):
            equal = [c == b for c, b in zip(self.columns[:i], self.bounds[:i], strict=True)]
            strict.append(
                and_(*equal, column > bound if self.comparison == AFTER else column < bound)
            )
        if self.comparison == UP_TO:
            strict.append(and_(*(c == b for c, b in zip(self.columns, self.bounds, strict=True))))
        first, first_bound = self.columns[0], self.bounds[0]
        start = first >= first_bound if self.comparison == AFTER else first <= first_bound
        return and_(start, or_(*strict))


@compiles(KeyCompare)
def _row_value(element: KeyCompare, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.row_value(), **kw)


@compiles(KeyCompare, "mysql")
@compiles(KeyCompare, "mariadb")
def _spelled_out(element: KeyCompare, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.spelled_out(), **kw)


def key_after(
    columns: Sequence[ColumnElement[Any]], bounds: Sequence[ColumnElement[Any]]
) -> ColumnElement[bool]:
    """`columns > bounds` in key order, one column or several."""
    if len(columns) == 1:
        return columns[0] > bounds[0]
    return KeyCompare(columns, bounds, AFTER)


def key_up_to(
    columns: Sequence[ColumnElement[Any]], bounds: Sequence[ColumnElement[Any]]
) -> ColumnElement[bool]:
    """`columns <= bounds` in key order, one column or several."""
    if len(columns) == 1:
        return columns[0] <= bounds[0]
    return KeyCompare(columns, bounds, UP_TO)
