"""The set-up behind `make test` / `make bench` (scripts/find_python.sh, scripts/setup_env.sh,
scripts/env_probe.py): which Python, whether an installed torch is reused, which torch wheel a GPU's
driver gets. Runs on a CPU machine in seconds and downloads nothing: interpreters and nvidia-smi are
small shell scripts in tmp_path where the case needs a machine that is not this one, and the one
case that makes a real venv reuses the torch of the interpreter running these tests, with pip's
indexes switched off so that any attempt to fetch a package would fail the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None or sys.platform == "win32", reason="the set-up scripts are bash")


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_python(bindir: Path, name: str, version: str, probe: dict | None = None) -> Path:
    """An interpreter that answers find_python.sh's version question, and env_probe.py's `info`
    with the given keys (so a machine with, say, a CUDA torch can be described on a CPU machine)."""
    answer = bindir / f"{name}.probe"
    answer.write_text("".join(f"{k}={v}\n" for k, v in (probe or {}).items()))
    return write_exe(
        bindir / name,
        "#!/bin/sh\n"
        f'case "$1" in\n  -c) echo {version}; exit 0 ;;\n'
        f'  */env_probe.py) [ "$2" = info ] && cat "{answer}"; exit 0 ;;\nesac\n'
        'echo "fake python: not expected: $*" >&2; exit 3\n',
    )


def fake_nvidia_smi(bindir: Path, driver: str | None) -> Path:
    """driver None: the tool is there but sees no GPU (its exit status 6 and message)."""
    if driver is None:
        return write_exe(bindir / "nvidia-smi", "#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    return write_exe(
        bindir / "nvidia-smi",
        "#!/bin/sh\n"
        'case "$*" in\n'
        "  *-L*) echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)' ;;\n"
        f"  *driver_version*) echo '{driver}' ;;\n"
        "  *) exit 2 ;;\nesac\n",
    )


def run_script(script: str, *args: str, env: dict, path_first: Path | None = None, only_path=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LORAXS_", "PYTHON", "REQUIREMENTS", "VENV"))}
    full.update(env)
    if only_path is not None:
        full["PATH"] = os.pathsep.join(str(p) for p in only_path)
    elif path_first is not None:
        full["PATH"] = f"{path_first}{os.pathsep}{full.get('PATH', '')}"
    return subprocess.run([BASH, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- which Python

def test_find_python_takes_312_when_311_is_hidden(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_python(bindir, "python3", "3.9.18")  # an old default python3 must be skipped, with its version
    fake_python(bindir, "python3.12", "3.12.4")
    r = run_script("find_python.sh", env={}, only_path=[bindir])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "python3.12"
    assert "Python 3.9.18, older than 3.10" in r.stderr
    assert shutil.which("python3.11", path=str(bindir)) is None


def test_find_python_prefers_python3(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_python(bindir, "python3", "3.13.1")
    fake_python(bindir, "python3.10", "3.10.14")
    r = run_script("find_python.sh", env={}, only_path=[bindir])
    assert (r.returncode, r.stdout.strip()) == (0, "python3"), r.stderr


def test_find_python_none_fits(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_python(bindir, "python3", "3.8.10")
    write_exe(bindir / "python3.12", "#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    r = run_script("find_python.sh", env={}, only_path=[bindir])
    assert r.returncode == 1 and r.stdout == ""
    assert "no Python >= 3.10 found on PATH" in r.stderr
    assert "Python 3.8.10, older than 3.10" in r.stderr
    assert "exits 127: pyenv: python3.12: command not found" in r.stderr


def test_find_python_explicit_too_old(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    old = fake_python(bindir, "python3.9", "3.9.18")
    fake_python(bindir, "python3", "3.12.4")  # not taken: PYTHON names the one to use
    r = run_script("find_python.sh", env={"PYTHON": str(old)}, only_path=[bindir])
    assert r.returncode == 1
    assert f"PYTHON={old} cannot be used" in r.stderr and "3.9.18, older than 3.10" in r.stderr


# ---------------------------------------------------------------- env_probe.py

def test_env_probe_missing(tmp_path):
    (tmp_path / "base.txt").write_text("# comment\npytest\n")
    (tmp_path / "req.txt").write_text("-r base.txt\n--extra-index-url https://example.invalid/simple\n"
                                      "pytest>=999\nsurely-not-installed-loraxs-xyz\npytest>=1.0  # ok\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/env_probe.py"), "missing", str(tmp_path / "req.txt"),
                        "--also", "torch>=2.0", "--also", "torch<1.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == ["pytest>=999", "surely-not-installed-loraxs-xyz", "torch<1.0"]


# ---------------------------------------------------------------- an interpreter that already has torch

def offline_pip(tmp_path: Path) -> dict:
    """pip with no index and an empty find-links: any package it tried to fetch would fail the run."""
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}


def test_venv_over_existing_torch_installs_nothing(tmp_path):
    # The interpreter running this test has torch, triton and requirements/common.txt (make test made
    # it so). A new venv on top of it must see them and run no pip at all.
    import torch

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_nvidia_smi(bindir, None)  # a CPU machine even where this test runs on a GPU one
    venv = tmp_path / "venv"
    r = run_script("setup_env.sh", "install", path_first=bindir,
                   env={"PYTHON": sys.executable, "VENV": str(venv), **offline_pip(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "the venv reuses them" in r.stderr and "nothing to install" in r.stderr
    assert "pip install" not in r.stderr, r.stderr
    # torch is read from the interpreter's environment, not copied or reinstalled into the venv
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    out = subprocess.run([str(venv / "bin/python"), "-c",
                          "import sys, importlib.util as u; print(sys.prefix); print(u.find_spec('torch').origin)"],
                         capture_output=True, text=True, timeout=120)
    prefix, torch_file = out.stdout.split("\n")[:2]
    assert Path(prefix) == venv and Path(torch_file) == Path(torch.__file__)

    # A second run finds the venv and still installs nothing.
    r2 = run_script("setup_env.sh", "install", path_first=bindir,
                    env={"PYTHON": sys.executable, "VENV": str(venv), **offline_pip(tmp_path)})
    assert r2.returncode == 0 and "using the existing venv" in r2.stderr and "nothing to install" in r2.stderr
    assert "pip install" not in r2.stderr


def test_only_missing_packages_go_to_pip_with_torch_pinned(tmp_path):
    import torch

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_nvidia_smi(bindir, None)
    reqs = tmp_path / "common.txt"
    reqs.write_text("pytest\nsurely-not-installed-loraxs-xyz\n")
    r = run_script("setup_env.sh", "install", path_first=bindir,
                   env={"PYTHON": sys.executable, "VENV": str(tmp_path / "venv"),
                        "LORAXS_COMMON_REQUIREMENTS": str(reqs), **offline_pip(tmp_path)})
    # pip cannot fetch the made-up package offline: the set-up says so and goes on
    assert r.returncode == 0, r.stderr
    pip_lines = [line for line in r.stderr.splitlines() if line.startswith("+ ") and " pip install" in line]
    assert len(pip_lines) == 1, r.stderr
    args = pip_lines[0].split()
    cons = args.index("-c")
    assert args[cons + 2:] == ["surely-not-installed-loraxs-xyz"], pip_lines[0]
    assert f"torch stays {torch.__version__}" in r.stderr
    assert "could not install: surely-not-installed-loraxs-xyz" in r.stderr


def test_system_mode_uses_the_interpreter_as_is(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_nvidia_smi(bindir, None)
    reqs = tmp_path / "common.txt"
    reqs.write_text("pytest\nsurely-not-installed-loraxs-xyz\n")
    venv = tmp_path / "venv"
    r = run_script("setup_env.sh", "install", path_first=bindir,
                   env={"LORAXS_USE_SYSTEM": "1", "PYTHON": sys.executable, "VENV": str(venv),
                        "LORAXS_COMMON_REQUIREMENTS": str(reqs), **offline_pip(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "as it is (LORAXS_USE_SYSTEM=1)" in r.stderr
    assert "missing: surely-not-installed-loraxs-xyz" in r.stderr
    assert "pip install" not in r.stderr and not venv.exists()


def test_system_mode_without_torch_stops(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_nvidia_smi(bindir, None)
    py = fake_python(bindir, "python3.12", "3.12.4", {"python": "3.12.4", "is_venv": 0, "pip": "24.0",
                                                       "torch_error": "ModuleNotFoundError: No module named 'torch'"})
    r = run_script("setup_env.sh", "install", path_first=bindir, env={"LORAXS_USE_SYSTEM": "1", "PYTHON": str(py)})
    assert r.returncode == 1
    assert "LORAXS_USE_SYSTEM=1 uses" in r.stderr and "No module named 'torch'" in r.stderr


# ---------------------------------------------------------------- which torch wheel, decided by the GPU's driver

NO_TORCH = {"python": "3.12.4", "is_venv": 0, "pip": "24.0", "torch_error": "ModuleNotFoundError: No module named 'torch'"}


def plan(tmp_path, probe: dict, driver: str | None, gpu_tool: bool = True):
    """LORAXS_SETUP_PLAN=1: the decisions and commands, nothing run, for a fake interpreter."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if gpu_tool:
        fake_nvidia_smi(bindir, driver)
    py = fake_python(bindir, "python3.12", "3.12.4", probe)
    env = {"PYTHON": str(py), "VENV": str(tmp_path / "venv"), "LORAXS_SETUP_PLAN": "1"}
    return run_script("setup_env.sh", "install", path_first=bindir, env=env)


@pytest.mark.parametrize("driver", ["580.65.06", "590.48.01", "610.10"])
def test_driver_for_cuda13_gets_gpu_requirements(tmp_path, driver):
    r = plan(tmp_path, NO_TORCH, driver)
    assert r.returncode == 0, r.stderr
    assert f"driver {driver}" in r.stderr
    assert "pip install -q -r requirements/gpu.txt" in r.stderr
    assert "--system-site-packages" not in r.stderr


@pytest.mark.parametrize("driver,needs", [
    ("580.65.05", "whl/cu128"),  # one patch below CUDA 13.0's minimum
    ("575.57.08", "whl/cu128"),
    ("570.26", "whl/cu128"),
    ("565.57.01", "whl/cu126"),
    ("550.54.14", "a driver update first"),
])
def test_older_driver_stops_naming_driver_and_wheel(tmp_path, driver, needs):
    r = plan(tmp_path, NO_TORCH, driver)
    assert r.returncode == 1
    assert f"NVIDIA driver {driver} is older than 580.65.06" in r.stderr
    assert needs in r.stderr
    assert "pip install -q -r" not in r.stderr


@pytest.mark.parametrize("gpu_tool", [True, False])
def test_no_gpu_gets_cpu_requirements(tmp_path, gpu_tool):
    r = plan(tmp_path, NO_TORCH, None, gpu_tool=gpu_tool)
    assert r.returncode == 0, r.stderr
    assert "pip install -q -r requirements/cpu.txt" in r.stderr


def test_cuda_torch_that_sees_the_gpu_is_reused(tmp_path):
    # The H200 image: system Python 3.12 with torch 2.11 + CUDA 13.0 and triton 3.6.
    probe = {"python": "3.12.3", "is_venv": 0, "pip": "24.0", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
             "cuda_available": 1, "gpu_arch": "9.0", "triton": "3.6.0"}
    r = plan(tmp_path, probe, "580.95.05")
    assert r.returncode == 0, r.stderr
    assert "torch 2.11.0+cu130 (CUDA 13.0), triton 3.6.0: the venv reuses them" in r.stderr
    assert "-m venv --system-site-packages --without-pip" in r.stderr
    assert "pip install" not in r.stderr


@pytest.mark.parametrize("probe,why", [
    ({"torch": "2.13.0+cpu", "torch_cuda": ""}, "is a CPU build and nvidia-smi sees a GPU"),
    ({"torch": "2.11.0+cu130", "torch_cuda": "13.0", "cuda_available": 0, "triton": "3.6.0"}, "cannot use the GPU"),
    ({"torch": "2.11.0+cu130", "torch_cuda": "13.0", "cuda_available": 1,
      "triton_error": "ModuleNotFoundError: No module named 'triton'"}, "has no Triton"),
])
def test_torch_unfit_for_the_gpu_is_not_reused(tmp_path, probe, why):
    r = plan(tmp_path, {"python": "3.12.3", "is_venv": 0, "pip": "24.0", **probe}, "590.48.01")
    assert r.returncode == 0, r.stderr
    assert why in r.stderr
    assert "pip install -q -r requirements/gpu.txt" in r.stderr
    assert "--system-site-packages" not in r.stderr


# ---------------------------------------------------------------- the Makefile wires it up

def test_makefile_system_mode_runs_the_found_python(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    r = subprocess.run([make, "-n", "test", "LORAXS_USE_SYSTEM=1", f"PYTHON={sys.executable}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{sys.executable} -m pytest tests benchmarks" in r.stdout
    r = subprocess.run([make, "-n", "test", f"VENV={tmp_path / 'v'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"VENV={tmp_path / 'v'} bash scripts/setup_env.sh install" in r.stdout
    assert f"{tmp_path / 'v'}/bin/python -m pytest tests benchmarks" in r.stdout


# ---------------------------------------------------------------- the build step

GPU_TORCH = {"python": "3.12.3", "is_venv": 1, "pip": "24.0", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
             "cuda_available": 1, "gpu_arch": "9.0", "triton": "3.6.0"}


@pytest.mark.parametrize("system", [False, True])
def test_build_targets_the_visible_gpu_offline(tmp_path, system):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    fake_nvidia_smi(bindir, "580.95.05")
    py = fake_python(bindir, "python", "3.12.3", GPU_TORCH)
    env = {"VENV": str(tmp_path / "venv"), "LORAXS_SETUP_PLAN": "1"}
    if system:
        env.update(LORAXS_USE_SYSTEM="1", PYTHON=str(py))
    r = run_script("setup_env.sh", "build", path_first=bindir, env=env)
    assert r.returncode == 0, r.stderr
    assert "CUDA code for this GPU: sm_90" in r.stderr
    expected = f"+ {py} setup.py -q build_ext --inplace" if system else \
        f"+ {py} -m pip install -q --no-index --no-build-isolation --no-deps -e ."
    assert expected in r.stderr
