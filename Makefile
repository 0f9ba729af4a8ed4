# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make bench    the main job: the benchmark suite on whatever device is here
#   make test     the tests (what CI runs)
# Both create .venv on first use, build the C++ extension into it, and reuse both afterwards. torch
# comes from requirements/gpu.txt (CUDA build) when nvidia-smi sees a GPU, else requirements/cpu.txt.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
REQUIREMENTS ?= requirements/$(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu).txt
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: venv build test bench bench-smoke cmake-check ci clean aot-report cuda-check gpu-check

venv: $(VENV)/.installed
$(VENV)/.installed: $(REQUIREMENTS) requirements/common.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed setup.py pyproject.toml CMakeLists.txt $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: build
	$(PY) -m pytest tests benchmarks -q --benchmark-disable

bench: build
	$(PY) -m benchmarks

bench-smoke: build
	$(PY) -m benchmarks --preset smoke

# The same C++ sources built by CMake (find_package(Torch)) and tested against the reference.
cmake-check: build
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake
	LORAXS_NATIVE_LIB=$(CURDIR)/build/cmake/libloraxs_C.so $(PY) -m pytest tests/test_native.py -q

# Everything CI checks; .ci/run calls this. The README's test command runs last, so that CI's
# closing lines are pytest's summary.
ci: cmake-check aot-report cuda-check bench-smoke test

clean:
	rm -rf build $(VENV)/.built loraxs_kernels/_C*.so *.egg-info

# ---- Triton backend (issue 3): compile every kernel and config for sm_80 and sm_90, no GPU needed.
aot-report: build
	mkdir -p build && $(PY) -m loraxs_kernels.tools.aot_report --check > build/aot_report.json
	@echo "wrote build/aot_report.json"

# ---- CUDA C++ backend (issue 4): build the CUDA extension for sm_80/sm_90 against the CUDA torch
# wheel in its own venv, check registers/spills/shared memory, load it on this CPU machine.
cuda-check:
	CUDA_CHECK_CMAKE=1 bash scripts/cuda_check.sh

# ---- On a GPU machine (image with torch, triton, pytest; no network): build, GPU tests, quick benchmark.
gpu-check:
	bash scripts/gpu_check.sh
