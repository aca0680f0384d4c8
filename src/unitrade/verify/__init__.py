"""`unitrade verify`: a checker that runs a workload against a cluster under faults."""
