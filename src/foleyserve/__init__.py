"""foleyserve: a faithful, cheaper engine and service for HunyuanVideo-Foley."""

__version__ = "0.1.0"
