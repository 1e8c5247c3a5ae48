"""Answers the router gives without scheduling a backend: the exact response cache (in-process L1
plus a shared Redis L2), the semantic cache and the embedding cache."""
