"""Scaling-law fits, plots and the HTML report over a runs directory."""
