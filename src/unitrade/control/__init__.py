"""The control plane: rule history, push and acknowledgements, switchover workflows."""
