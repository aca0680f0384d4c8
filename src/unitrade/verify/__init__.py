"""`unitrade verify`: workloads against a cluster under faults, a history of every
operation, and checkers of the invariants over that history (docs/operations.md,
"Verifying a cluster")."""
