"""tllab: config-driven transfer-learning and domain-adaptation experiments."""

__version__ = "0.1.0"
