"""Packaged study files (``convscale quickstart`` runs quickstart.toml)."""
