"""Telemetry: Prometheus metrics now; traces and analytics over the ledger later."""

from conclave.telemetry.metrics import Metrics

__all__ = ["Metrics"]
