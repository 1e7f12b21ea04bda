"""Packaged study files (``convscale quickstart`` runs powerlaw.toml; ``--study quickstart`` the 4-minute one)."""
