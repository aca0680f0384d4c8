"""The HTTP edge of a region: authentication, routing to the owner region, forwarding,
error mapping, and the internal API other regions call."""
