"""Services: orders, cart, catalog and center inventory. They know cells and the data access
layer, never HTTP (the gateway maps their typed errors to responses)."""
