"""Job launchers: Slurm batch scripts that start torchrun on every node (`scripts/launch_slurm.py`)."""
