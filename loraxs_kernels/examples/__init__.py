"""Runnable examples: `python -m loraxs_kernels.examples.finetune`."""
