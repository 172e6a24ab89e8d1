"""Per-example loss functions (no reduction) and the optax transforms that belong with them."""
