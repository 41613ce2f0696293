"""Shared test helpers: a zoo of tiny models, random architectures and assertion helpers."""
