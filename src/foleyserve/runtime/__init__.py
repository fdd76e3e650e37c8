"""Serving runtime: request batching and the feature/result cache."""
