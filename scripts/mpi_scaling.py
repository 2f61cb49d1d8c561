"""`tinyvit mpi-scaling`, run from a checkout: its parser and code are tinyvit/cli/commands/mpi_scaling.py."""
from tinyvit.cli.commands.mpi_scaling import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
