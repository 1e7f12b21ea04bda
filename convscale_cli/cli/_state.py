"""Process-wide CLI flags set by the root callback (kept in a tiny module to avoid import cycles)."""

debug: bool = False
