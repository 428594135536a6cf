"""ganray's data plane: the data readers, deterministic sharding, the shared step code and the Ray actors."""
