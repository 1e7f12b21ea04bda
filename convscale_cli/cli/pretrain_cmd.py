"""convscale pretrain (training engine)."""

from convscale_cli.cli import app  # noqa: F401  (commands register on the shared app)
