"""Score-based medical image reconstruction toolkit."""
__version__ = "0.1.0"
