"""Training: the loop (accelerate), its config, and full-ranking validation."""
