#!/usr/bin/env bash
# The set-up behind `make test` / `make bench` (the Makefile's venv and build rules call this).
#
#   setup_env.sh install   make an environment that has torch (+ Triton) and requirements/common.txt
#   setup_env.sh build     build the C++ (and, with nvcc and a CUDA torch, CUDA) extension into it
#
# Which environment (printed, with the reason, on every run):
#   LORAXS_USE_SYSTEM=1    the Python that scripts/find_python.sh finds, as it is: no venv, nothing
#                          installed into it (missing packages are listed); the extension is built in
#                          place (loraxs_kernels/_C*.so), and the commands run from the repository root.
#   default                $VENV (.venv). An existing one is kept. A new one is made from the Python
#                          found; when that Python already has a usable torch (on a GPU machine: a CUDA
#                          build that sees the GPU, and Triton), the venv sees its packages
#                          (--system-site-packages, or a .pth for a Python that is itself a venv), so
#                          torch is reused, never downloaded; only missing requirements are installed,
#                          with torch pinned to the version present. Nothing missing: pip is not run.
#   LORAXS_USE_SYSTEM=0    never reuse: a plain venv with torch from the requirements file (below).
# The torch requirements file, when torch must be installed: $REQUIREMENTS if set; else
# requirements/gpu.txt (CUDA 13.0 build) when nvidia-smi sees a GPU whose driver supports CUDA 13.0,
# a stop with the driver and the build it needs when it does not; else requirements/cpu.txt.
# LORAXS_SETUP_PLAN=1 prints the decisions and the commands without running them.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
COMMON=${LORAXS_COMMON_REQUIREMENTS:-requirements/common.txt}
# The Triton range the kernels are written for (docs/gpu-without-gpu.md: 3.6 through 3.9).
TRITON_REQ=${LORAXS_TRITON_REQUIREMENT:-triton>=3.6,<3.10}
PLAN=${LORAXS_SETUP_PLAN:-0}
PROBE=scripts/env_probe.py

# NVIDIA's "CUDA Toolkit and Corresponding Driver Versions" table (CUDA toolkit release notes): the
# minimum Linux x86_64 driver for each CUDA version a torch build may carry. requirements/gpu.txt's
# torch 2.14.1 pins cuda-toolkit 13.0.3 (its wheel metadata), so it needs the CUDA 13.0 row.
DRIVER_CUDA_13_0=580.65.06
DRIVER_CUDA_12_8=570.26
DRIVER_CUDA_12_6=560.28.03

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }
run() {  # echo a command; run it unless planning
  echo "+ $*" >&2
  [ "$PLAN" = 1 ] || "$@"
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

# key=value lines of env_probe.py into variables p_<key>
probe() {  # probe PYTHON [--gpu]
  local line
  for v in python executable is_venv site_packages pip pip_error torch torch_dist torch_cuda torch_error \
           cuda_available gpu_arch triton triton_error; do eval "p_$v="; done
  while IFS= read -r line; do
    case $line in *=*) printf -v "p_${line%%=*}" '%s' "${line#*=}" ;; esac
  done < <("$1" "$PROBE" info "${@:2}")
}

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
gpu_flag() { if gpu_present; then echo --gpu; fi; }

# Sets why_unusable to the reason the probed torch cannot serve here ("" = usable).
judge_torch() {
  why_unusable=
  if [ -z "$p_torch" ]; then why_unusable="no torch (${p_torch_error:-not installed})"; return; fi
  gpu_present || return 0
  if [ -z "$p_torch_cuda" ]; then why_unusable="torch $p_torch is a CPU build and nvidia-smi sees a GPU"
  elif [ "$p_cuda_available" != 1 ]; then
    why_unusable="torch $p_torch (CUDA $p_torch_cuda) cannot use the GPU (torch.cuda.is_available() is False; driver $(driver_version))"
  elif [ -z "$p_triton" ]; then why_unusable="torch $p_torch has no Triton (${p_triton_error:-})"
  fi
}

driver_version() { nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' '; }

# The requirements file that installs torch here, or a stop that names the driver and the build needed.
choose_requirements() {
  if [ -n "${REQUIREMENTS:-}" ]; then say "torch from $REQUIREMENTS (REQUIREMENTS is set)"; echo "$REQUIREMENTS"; return; fi
  if ! gpu_present; then say "no GPU (nvidia-smi absent or sees none): the CPU wheel, requirements/cpu.txt"; echo requirements/cpu.txt; return; fi
  local drv; drv=$(driver_version)
  [ -n "$drv" ] || die "nvidia-smi lists a GPU but reports no driver version; set REQUIREMENTS=requirements/gpu.txt (CUDA 13.0, driver >= $DRIVER_CUDA_13_0) or requirements/cpu.txt"
  if version_ge "$drv" "$DRIVER_CUDA_13_0"; then
    say "GPU with driver $drv (>= $DRIVER_CUDA_13_0, CUDA 13.0): the CUDA 13.0 torch build, requirements/gpu.txt"
    echo requirements/gpu.txt; return
  fi
  local build
  if version_ge "$drv" "$DRIVER_CUDA_12_8"; then build="the CUDA 12.8 build: python -m pip install torch --index-url https://download.pytorch.org/whl/cu128"
  elif version_ge "$drv" "$DRIVER_CUDA_12_6"; then build="the CUDA 12.6 build: python -m pip install torch --index-url https://download.pytorch.org/whl/cu126"
  else build="a driver update first (CUDA 12.6 builds need >= $DRIVER_CUDA_12_6, CUDA 13.0 >= $DRIVER_CUDA_13_0)"
  fi
  die "NVIDIA driver $drv is older than $DRIVER_CUDA_13_0, which requirements/gpu.txt's torch (a CUDA 13.0 build) needs.
  This driver needs $build
  Install that torch (and triton) into your Python and run make again: a torch already in that Python is reused.
  Or update the driver to >= $DRIVER_CUDA_13_0, or set REQUIREMENTS=requirements/cpu.txt to run on the CPU only."
}

make_venv() {  # make_venv PYTHON REUSE(0/1); sets nothing, creates $VENV
  local py=$1 reuse=$2 args=()
  if [ "$reuse" = 1 ]; then
    # A Python without pip: the venv gets its own from ensurepip; with pip, the venv uses it.
    [ -n "$p_pip" ] && args+=(--without-pip)
    if [ "$p_is_venv" = 1 ]; then
      # --system-site-packages would show the base interpreter's packages, not this venv's, so the new
      # venv reads the packages of the found one through a .pth (site.addsitedir runs their .pth too).
      run "$py" -m venv "${args[@]}" "$VENV"
      local sp; sp=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || echo "$VENV/lib/site-packages")
      say "the venv reads the packages of $p_executable through $sp/_loraxs_base_env.pth"
      if [ "$PLAN" != 1 ]; then
        local IFS=:; for d in $p_site_packages; do
          printf 'import site; site.addsitedir(%s)\n' "'$d'"
        done > "$sp/_loraxs_base_env.pth"
      fi
    else
      run "$py" -m venv --system-site-packages "${args[@]}" "$VENV"
    fi
  else
    run "$py" -m venv "$VENV"
  fi
}

install_missing() {  # install_missing PYTHON ALLOW_INSTALL(0/1)
  local py=$1 allow=$2 missing
  mapfile -t missing < <("$py" "$PROBE" missing "$COMMON" --also "$TRITON_REQ")
  if [ ${#missing[@]} -eq 0 ]; then
    say "nothing to install: torch $p_torch${p_torch_cuda:+ (CUDA $p_torch_cuda)}, triton $p_triton and everything in $COMMON are present"
    return 0
  fi
  if [ "$allow" != 1 ]; then
    say "not installing into your environment (LORAXS_USE_SYSTEM=1); missing: ${missing[*]}"
    say "the steps that need them will skip or fail; install them yourself to run everything"
    return 0
  fi
  say "installing only what is missing: ${missing[*]} (torch stays $p_torch)"
  local cons; cons=$(mktemp); echo "torch==${p_torch_dist:-$p_torch}" > "$cons"
  # One quick try: on a machine without network pip gives up in seconds instead of minutes.
  if ! run "$py" -m pip install -q --retries 1 --timeout 15 -c "$cons" "${missing[@]}"; then
    rm -f "$cons"
    mapfile -t missing < <("$py" "$PROBE" missing "$COMMON" --also "$TRITON_REQ")
    say "warning: pip could not install: ${missing[*]} (no network?); going on with what is installed"
    for m in "${missing[@]}"; do
      case $m in setuptools*) die "the build needs $m; install it into $py's environment" ;; esac
    done
    return 0
  fi
  rm -f "$cons"
}

cmd_install() {
  local py reuse
  if [ "${LORAXS_USE_SYSTEM:-}" = 1 ]; then
    py=$(bash scripts/find_python.sh) || exit 1
    probe "$py" $(gpu_flag)
    judge_torch
    [ -z "$why_unusable" ] || die "LORAXS_USE_SYSTEM=1 uses $py ($p_executable) as it is, and it has $why_unusable.
  Install torch there, or run without LORAXS_USE_SYSTEM to get a venv."
    say "using $py ($p_executable, Python $p_python) as it is (LORAXS_USE_SYSTEM=1): torch $p_torch${p_torch_cuda:+ (CUDA $p_torch_cuda)}, triton ${p_triton:-none}"
    install_missing "$py" 0
    return
  fi

  if [ -x "$VENV/bin/python" ]; then
    say "using the existing venv $VENV"
  else
    py=$(bash scripts/find_python.sh) || exit 1
    probe "$py" $(gpu_flag)
    judge_torch
    reuse=0
    if [ "${LORAXS_USE_SYSTEM:-}" = 0 ]; then
      say "LORAXS_USE_SYSTEM=0: a plain venv, torch from the requirements file"
    elif [ -z "$why_unusable" ]; then
      reuse=1
      say "$py ($p_executable) has torch $p_torch${p_torch_cuda:+ (CUDA $p_torch_cuda)}, triton ${p_triton:-none}: the venv reuses them"
    else
      say "$py ($p_executable) has $why_unusable: a plain venv, torch from the requirements file"
    fi
    if [ "$PLAN" = 1 ] && [ "$reuse" = 1 ]; then
      make_venv "$py" 1
      say "plan: then install only what $py lacks of $COMMON and $TRITON_REQ"; return
    fi
    if [ "$PLAN" = 1 ]; then
      make_venv "$py" 0
      local req; req=$(choose_requirements)
      run "$VENV/bin/python" -m pip install -q --upgrade pip
      run "$VENV/bin/python" -m pip install -q -r "$req"
      return
    fi
    make_venv "$py" "$reuse"
    # The new venv sees exactly what $py has (probed above): no second torch import.
    if [ "$reuse" = 1 ]; then install_missing "$VENV/bin/python" 1; return; fi
  fi

  probe "$VENV/bin/python" $(gpu_flag)
  judge_torch
  local record=$VENV/.loraxs-requirements req
  if [ -z "$why_unusable" ] && [ -f "$record" ]; then
    # A venv this script filled from a requirements file follows that file (a changed pin reinstalls).
    req=$(cat "$record")
    local missing; mapfile -t missing < <("$VENV/bin/python" "$PROBE" missing "$req")
    if [ ${#missing[@]} -eq 0 ]; then say "nothing to install: $VENV already satisfies $req"; return; fi
    say "$VENV does not satisfy ${missing[*]} from $req"
    run "$VENV/bin/python" -m pip install -q -r "$req"
    return
  fi
  if [ -z "$why_unusable" ]; then
    install_missing "$VENV/bin/python" 1
    return
  fi
  say "$VENV has $why_unusable"
  req=$(choose_requirements)
  run "$VENV/bin/python" -m pip install -q --upgrade pip
  run "$VENV/bin/python" -m pip install -q -r "$req"
  echo "$req" > "$record"
}

cmd_build() {
  local py
  if [ "${LORAXS_USE_SYSTEM:-}" = 1 ]; then py=$(bash scripts/find_python.sh 2>/dev/null); else py=$VENV/bin/python; fi
  # The GPU's own architecture when one is visible (setup.py's default is sm_80 and sm_90).
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && gpu_present; then
    probe "$py" --gpu
    if [ -n "$p_gpu_arch" ]; then export TORCH_CUDA_ARCH_LIST=$p_gpu_arch; say "CUDA code for this GPU: sm_${p_gpu_arch/./}"; fi
  fi
  if [ "${LORAXS_USE_SYSTEM:-}" = 1 ]; then
    run "$py" setup.py -q build_ext --inplace
  else
    run "$py" -m pip install -q --no-index --no-build-isolation --no-deps -e .
  fi
}

case ${1:-install} in
  install) cmd_install ;;
  build) cmd_build ;;
  *) die "usage: setup_env.sh install|build" ;;
esac
