"""linewatch: streaming visual anomaly monitor for production lines."""

__version__ = "0.1.0"
