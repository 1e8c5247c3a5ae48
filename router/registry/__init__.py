"""The registry: API keys and their tenants (SQLite here; PostgreSQL in a cluster)."""

from router.registry.keys import API_KEY_PREFIX, KeyRecord, KeyStore, looks_like_api_key

__all__ = ["API_KEY_PREFIX", "KeyRecord", "KeyStore", "looks_like_api_key"]
