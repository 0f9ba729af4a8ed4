"""Microbenchmarks of LoRA-XS layers: this package's backends against the layers people use today.

One definition of what is measured, shared by the CLI (`python -m benchmarks`) and the pytest-benchmark
tests (`pytest benchmarks/`):

    cases.py      layer shapes from real models, token counts, ranks, dtypes, modes, presets
    providers.py  the implementations compared on the same inputs (nn_linear, unfused, peft_lora,
                  compiled_unfused, and the package backends torch / cpp / triton / cuda)
    measure.py    timing (CUDA events or perf_counter), bytes saved for backward, peak memory
    roofline.py   FLOPs and minimum bytes per case and mode, and the one table of device peaks
    report.py     results.json, results.md and the PNG plots
    __main__.py   the CLI

See docs/benchmarks.md for how to run it and how to read the output.
"""
