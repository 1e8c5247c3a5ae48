"""Retrieval: HNSW collections (hnswlib) with snapshot + write-ahead-log persistence.

`index.VectorIndex` is the in-memory index (synchronous), `collection.Collection` adds the lock
discipline, the executor and durability, `store.CollectionStore` owns the collections on disk."""
