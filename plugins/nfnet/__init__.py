"""Built-in NFNet plugin (Brock et al. 2021; DeepMind reference implementation)."""
