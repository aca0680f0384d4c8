"""HTTP plumbing shared by the gateway, the control plane and replication: JSON and error
responses, bearer tokens, signed region-to-region endpoints. It knows no route."""
