"""Storage backends of the hybrid index (the keyword side; Qdrant is used directly)."""
