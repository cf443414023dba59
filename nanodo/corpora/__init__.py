"""Corpora: text sources, tokenizers, token caches, and the inputs of a run assembled from them."""
