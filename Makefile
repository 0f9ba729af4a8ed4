# Two commands do all the set-up on a machine with any Python >= 3.10:
#   make bench    the main job: the benchmark suite on whatever device is here
#   make test     the tests (what CI runs)
# Both create .venv on first use, build the C++ extension into it, and reuse both afterwards.
# scripts/setup_env.sh decides what goes in (its header has the rules): a torch the found Python
# already has is reused and only missing packages are installed; without one, torch comes from
# requirements/gpu.txt (CUDA 13.0 build) when nvidia-smi sees a GPU whose driver supports it, else
# requirements/cpu.txt. PYTHON=... picks the interpreter (scripts/find_python.sh searches otherwise);
# LORAXS_USE_SYSTEM=1 runs in that interpreter's environment as it is, with no venv.

VENV ?= .venv
ifeq ($(LORAXS_USE_SYSTEM),1)
PY := $(or $(shell PYTHON='$(PYTHON)' bash scripts/find_python.sh 2>/dev/null),no-python-found)
ENV_STAMPS := build/system-env
else
PY := $(VENV)/bin/python
ENV_STAMPS := $(VENV)
endif
SETUP := scripts/setup_env.sh scripts/find_python.sh scripts/env_probe.py $(wildcard requirements/*.txt)
CSRC := $(shell find csrc -path csrc/emu -prune -o \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print 2>/dev/null)  # csrc/emu: the host emulation, not in the extension

.PHONY: venv build test bench bench-smoke cmake-check ci clean aot-report cuda-check gpu-check

venv: $(ENV_STAMPS)/.installed
$(ENV_STAMPS)/.installed: $(SETUP)
	VENV=$(VENV) bash scripts/setup_env.sh install
	mkdir -p $(@D) && touch $@

build: $(ENV_STAMPS)/.built
$(ENV_STAMPS)/.built: $(ENV_STAMPS)/.installed setup.py pyproject.toml CMakeLists.txt $(CSRC)
	VENV=$(VENV) bash scripts/setup_env.sh build
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
ci: cmake-check aot-report-all cuda-check cuda-emu bench-smoke test

clean:
	rm -rf build $(VENV)/.built loraxs_kernels/_C*.so *.egg-info

# ---- Triton backend (issue 3): compile every kernel and config for sm_80 and sm_90, no GPU needed.
aot-report: build
	mkdir -p build && $(PY) -m loraxs_kernels.tools.aot_report --check > build/aot_report.json
	@echo "wrote build/aot_report.json"

# The same report under every other Triton the project claims: 3.6 (GPU images, the H200 one included)
# and 3.8 (what the CUDA torch 2.14.1 wheel pins). Each Triton is pip-installed alone into
# build/triton-<v> (cached there) and put ahead of the venv's on PYTHONPATH: the venv's CPU torch serves.
AOT_TRITONS ?= 3.6.0 3.8.0
.PHONY: aot-report-all
.PRECIOUS: build/triton-%/.installed
aot-report-all: aot-report $(addprefix aot-report-,$(AOT_TRITONS))
build/triton-%/.installed:
	$(PY) -m pip install -q --no-deps --target build/triton-$* triton==$*
	touch $@
aot-report-%: build build/triton-%/.installed
	PYTHONPATH=$(CURDIR)/build/triton-$* $(PY) -m loraxs_kernels.tools.aot_report --check > build/aot_report-$*.json
	@echo "wrote build/aot_report-$*.json"

# ---- CUDA C++ backend (issue 4): build the CUDA extension for sm_80/sm_90 against the CUDA torch
# wheel in its own venv, check registers/spills/shared memory, load it on this CPU machine.
cuda-check:
	CUDA_CHECK_CMAKE=1 bash scripts/cuda_check.sh

# ---- CUDA C++ kernels run on the CPU (issue 9): the same kernel sources built by g++ with host twins
# of their PTX, under memcheck (ASan) and racecheck (TSan), against the fp64 reference. No GPU needed.
.PHONY: cuda-emu
cuda-emu: build
	PYTHON=$(PY) bash scripts/cuda_emu.sh

# ---- On a GPU machine (image with torch, triton, pytest; no network): build, GPU tests, quick benchmark.
gpu-check:
	bash scripts/gpu_check.sh
