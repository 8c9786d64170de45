"""RAG: loaders, chunkers, embeddings, hybrid index, retrieval, answers with citations."""
