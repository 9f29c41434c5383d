"""A felix node: supervisor, process topology and configuration."""
