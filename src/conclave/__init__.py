"""Conclave: local-first, privacy-first multi-agent RAG orchestrator."""

__version__ = "0.1.0"
