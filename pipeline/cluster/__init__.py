"""Orchestration: the whole-pipeline runner and its Slurm scripts."""
