"""Metrics, drift and the Prometheus/Grafana/Alertmanager configuration."""
