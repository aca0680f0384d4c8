"""Storage: the data access layer. Engines, schema, the write fence and changelog capture.

Every write goes through `CellStore.write()`, which admits it through the fence (is this
region the cell's owner under the current rule, and is the cell not banned?) and, in the same
transaction, appends a changelog row per changed row (docs/architecture.md).
"""
