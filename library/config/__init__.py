"""Typed, validated, read-only configuration (TOML + command line). Imports no torch."""
from library.config.loader import Config, build_config  # noqa: F401
