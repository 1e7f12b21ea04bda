from convscale_cli.cli import run

run()
