"""Metrics (Prometheus) and logs."""
