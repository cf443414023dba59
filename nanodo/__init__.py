"""nanodo: a minimal Transformer decoder-only language model in JAX."""
