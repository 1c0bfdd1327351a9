"""Derivative-free searches over a few merge hyper-parameters (λ, α, β, …)."""

from adamerge.search.local import SearchResult, local_search

__all__ = ["SearchResult", "local_search"]
