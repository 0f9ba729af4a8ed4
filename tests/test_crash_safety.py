"""A save killed at any instant leaves the old adapter or the new one, never a mix (adapters/atomic.py).

The crash test: a child process (forked from a forkserver that has torch and this module imported, so
each child starts in milliseconds instead of the ~5 s of `import torch` here) saves adapter "new" over
adapter "old" and SIGKILLs itself right after its k-th file-system call (every os.replace, rename,
fsync, symlink, link, mkdir, unlink, rmdir the save makes, for every k), or the parent kills it after
a random delay inside the save. Then, from the parent: the folder's two visible files are byte for byte
the old pair or the new pair, load_adapter gives R and scaling of that same adapter, and one more save
leaves no debris (only the two names, the pointer and one version folder; nothing beside the folder).

Kill points are counted with the same patched calls in the parent on an uninterrupted save, so the
loop covers every step the writer takes; the test asserts that count is large enough to mean the
patching sees the writer's calls (a save that bypassed them would leave the loop with nothing to kill).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from loraxs_kernels import FusedLoRAXSLinear, load_adapter, save_adapter
from loraxs_kernels.adapters.atomic import CONFIG_NAME, CURRENT, VERSION_PREFIX, WEIGHTS_NAME
from loraxs_kernels.interop.peft_lora import export_peft_lora

# The file-system calls a save is killed after. Looked up on `os` at call time by atomic.py and by
# shutil.rmtree, so patching the module attributes reaches every one of them.
PATCHED = ("replace", "rename", "fsync", "symlink", "link", "mkdir", "unlink", "rmdir")
SCALING = {"old": 2.0, "new": 3.0, "third": 5.0}
SEED = {"old": 1, "new": 2, "third": 3}


def base_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapted(which: str) -> nn.Module:
    """The base with LoRA-XS layers whose R and scaling identify adapter `which`."""
    model = base_model()
    g = torch.Generator().manual_seed(SEED[which])
    for i in (0, 2):
        layer = FusedLoRAXSLinear.from_linear(model[i], 2, SCALING[which])
        with torch.no_grad():
            layer.lora_R.copy_(torch.randn(2, 2, generator=g))
        model[i] = layer
    return model


def write(kind: str, which: str, path) -> None:
    model = adapted(which)
    if kind == "save":
        save_adapter(model, path)
    else:
        export_peft_lora(model, path)


class CountingOs:
    """Patches os.<PATCHED> to count calls; `on_call(n)` runs after the n-th (1-based) returns or raises."""

    def __init__(self, on_call=None):
        self.calls: list[str] = []
        self.on_call = on_call
        self._saved = {}

    def __enter__(self):
        for name in PATCHED:
            real = getattr(os, name)
            self._saved[name] = real

            def wrapper(*args, _real=real, _name=name, **kwargs):
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.calls.append(_name)
                    if self.on_call is not None:
                        self.on_call(len(self.calls))
            setattr(os, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(os, name, real)


def _child(kind: str, which: str, path: str, kill_after: int | None, started, count_to: str | None) -> None:
    """Runs in the forked child: save, SIGKILLing itself right after file-system call `kill_after`;
    the number of calls and the save's duration go to the file `count_to` when it completes."""
    torch.set_num_threads(1)

    def die(n):
        if n == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    started.set()
    t0 = time.perf_counter()
    with CountingOs(die) as counter:
        write(kind, which, path)
    if count_to:
        Path(count_to).write_text(json.dumps({"calls": len(counter.calls), "seconds": time.perf_counter() - t0}))


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        # symbolic_shapes (and sympy under it) is imported lazily by the first Module.to_empty, which
        # from_linear calls: 2.1 s of each child's 2.2 s here until it was preloaded too.
        _CTX.set_forkserver_preload(["torch", "torch.fx.experimental.symbolic_shapes", "loraxs_kernels", __name__])
    return _CTX


def run_child(kind, which, path, kill_after=None, kill_delay=None, count_to=None) -> int:
    """Every adapter file of these tests is written by such a child (the same imported code each time)."""
    ctx = _context()
    started = ctx.Event()
    p = ctx.Process(target=_child, args=(kind, which, str(path), kill_after, started, count_to and str(count_to)))
    p.start()
    if kill_delay is not None:
        assert started.wait(60), "the saving child did not start"
        time.sleep(kill_delay)
        p.kill()
    p.join(60)
    assert p.exitcode is not None, "the saving child hung"
    return p.exitcode


# ------------------------------------------------------------------------------------ the states
def visible_pair(path: Path):
    """(config bytes, weights) a reader of `path` sees, None for a name that is not there; the weights
    as (their header with sorted keys, their data bytes): safetensors writes the metadata map in
    hash order, so two writes of the same tensors differ in the header's byte order only."""
    def read(name):
        try:
            return (path / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
    weights = read(WEIGHTS_NAME)
    if weights is not None and len(weights) >= 8:
        n = int.from_bytes(weights[:8], "little")
        try:
            weights = (json.dumps(json.loads(weights[8:8 + n]), sort_keys=True), weights[8 + n:])
        except ValueError:
            pass  # a torn file stays raw bytes, and matches no whole adapter
    return read(CONFIG_NAME), weights


def loaded_identity(kind: str, path: Path) -> str:
    """Which adapter `path` holds, from loading it: R and scaling must both say the same one."""
    if kind == "save":
        model = load_adapter(base_model(), path)
        got = {i: (model[i].lora_R.detach(), model[i].scaling) for i in (0, 2)}
        matches = [w for w in ("old", "new") if all(
            torch.equal(got[i][0], adapted(w)[i].lora_R.detach()) and got[i][1] == SCALING[w] for i in (0, 2))]
    else:  # a PEFT LoRA file: lora_B.weight = scaling·Bᵀ and lora_A.weight = (A R)ᵀ carry both
        from loraxs_kernels.adapters.integrity import load_verified

        tensors = load_verified(path / WEIGHTS_NAME)
        matches = []
        for w in ("old", "new"):
            ref = adapted(w)
            ok = all(torch.allclose(tensors[f"base_model.model.{i}.lora_B.weight"], (SCALING[w] * ref[i].lora_B).t())
                     and torch.allclose(tensors[f"base_model.model.{i}.lora_A.weight"], (ref[i].lora_A @ ref[i].lora_R).t())
                     for i in (0, 2))
            matches += [w] if ok else []
    assert len(matches) == 1, f"{path} loads as {matches or 'neither adapter'}: R and scaling from different saves?"
    return matches[0]


def assert_clean(parent: Path, path: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == [path.name], sorted(p.name for p in parent.iterdir())
    names = sorted(p.name for p in path.iterdir())
    versions = [n for n in names if n.startswith(VERSION_PREFIX)]
    assert len(versions) == 1 and names == sorted([CONFIG_NAME, WEIGHTS_NAME, CURRENT, *versions]), names
    assert sorted(p.name for p in (path / versions[0]).iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def make_legacy(path: Path, source: Path) -> None:
    """The adapter at `source` as plain files, as the writer before atomic.py left them, with its crash debris."""
    path.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (path / name).write_bytes((source / name).read_bytes())
    (path / "tmpab12cd_x.tmp").write_bytes(b"half a safetensors file")
    (path / "tmpab12cd_x.tmp.json").write_text("{")


def prepare(start: str, kind: str, parent: Path, references) -> Path:
    shutil.rmtree(parent, ignore_errors=True)
    parent.mkdir(parents=True)
    path = parent / "adapter"
    old = references["dir", kind, "old"]
    if start == "existing":
        shutil.copytree(old, path, symlinks=True)
    elif start == "legacy":
        make_legacy(path, old)
    elif start == "empty":
        path.mkdir()
    return path  # "missing": nothing there


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Adapters "old" and "new" per kind (their folders, and their visible byte pairs), written by
    uninterrupted child processes."""
    root = tmp_path_factory.mktemp("refs")
    refs = {}
    for kind in ("save", "export"):
        for which in ("old", "new"):
            path = root / f"{kind}-{which}"
            assert run_child(kind, which, path) == 0
            refs[kind, which] = visible_pair(path)
            refs["dir", kind, which] = path
    return refs


def check_after_kill(kind, start, path, parent, references) -> str:
    pair = visible_pair(path)
    olds = {references[kind, "old"]} if start in ("existing", "legacy") else {(None, None)}
    allowed = {**{p: "old" for p in olds}, references[kind, "new"]: "new"}
    assert pair in allowed, (f"after the kill {path} shows config sha256 "
                             f"{[hashlib.sha256(repr(b).encode()).hexdigest()[:12] if b else None for b in pair]}: neither whole adapter")
    state = allowed[pair]
    if pair[0] is not None:
        assert loaded_identity(kind, path) == state
    write(kind, "new", path)  # one more save (here: no fork needed): it must succeed and leave nothing behind
    assert visible_pair(path) == references[kind, "new"]
    assert_clean(parent, path)
    return state


def measure_save(kind, start, parent, references) -> dict:
    """{"calls": file-system calls, "seconds": duration} of an uninterrupted save in a child."""
    path = prepare(start, kind, parent, references)
    assert run_child(kind, "new", path, count_to=parent / "count.json") == 0
    return json.loads((parent / "count.json").read_text())


# A save into a missing folder: 2 mkdirs, 2 file fsyncs, 2 folder fsyncs, 3 symlinks, 1 rename, 1
# fsync of the parent (12 counted); in place more. Fewer means the patching no longer sees the writer.
MIN_CALLS = 8


def kill_at_every_call(kind, start, tmp_path, references):
    n_calls = measure_save(kind, start, tmp_path / "count", references)["calls"]
    assert n_calls >= MIN_CALLS, f"only {n_calls} patched file-system calls in a {kind} save: is the patching bypassed?"
    seen = {"old": 0, "new": 0}
    for k in range(1, n_calls + 1):
        parent = tmp_path / f"k{k}"
        path = prepare(start, kind, parent, references)
        code = run_child(kind, "new", path, kill_after=k)
        assert code == -signal.SIGKILL, f"the child was to be killed after call {k} of {n_calls}, exit code {code}"
        seen[check_after_kill(kind, start, path, parent, references)] += 1
        shutil.rmtree(parent)
    print(f"\n{kind} over {start}: killed after each of {n_calls} calls; left old {seen['old']}, new {seen['new']}")
    # The first kill precedes any switch and the last follows it: both outcomes must occur.
    assert seen["old"] >= 1 and seen["new"] >= 1, seen


# Each kill costs a fork of the preloaded server, 0.3-0.8 s on the loaded 2-core machine (the save
# itself takes 65 ms): the default run keeps the two writers over an existing adapter.
@pytest.mark.parametrize("kind,start", [("save", "existing"), ("export", "existing")])
def test_kill_after_every_file_system_call(kind, start, tmp_path, references):
    kill_at_every_call(kind, start, tmp_path, references)


@pytest.mark.slow
@pytest.mark.parametrize("kind,start", [("save", "missing"), ("save", "legacy"), ("save", "empty"),
                                        ("export", "legacy"), ("export", "missing")])
def test_kill_after_every_file_system_call_more_starts(kind, start, tmp_path, references):
    kill_at_every_call(kind, start, tmp_path, references)


def kill_at_random_moments(kind, start, seed, n, tmp_path, references):
    # The window: an uninterrupted child's save, from its start signal to its end, as the child measured it.
    window = measure_save(kind, start, tmp_path / "timing", references)["seconds"]
    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    for i in range(n):
        parent = tmp_path / f"r{i}"
        path = prepare(start, kind, parent, references)
        run_child(kind, "new", path, kill_delay=rng.uniform(0, window))
        seen[check_after_kill(kind, start, path, parent, references)] += 1
        shutil.rmtree(parent)
    print(f"\n{kind} over {start}, seed {seed}: {n} kills within {window * 1e3:.0f} ms; old {seen['old']}, new {seen['new']}")


def test_kill_at_random_moments(tmp_path, references):
    kill_at_random_moments("save", "existing", 0, 6, tmp_path, references)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind,start", [("save", "existing"), ("save", "legacy"), ("export", "existing")])
def test_kill_at_random_moments_more_seeds(kind, start, seed, tmp_path, references):
    kill_at_random_moments(kind, start, seed, 10, tmp_path, references)


# ------------------------------------------------------------------------------- without killing
def test_layout_modes_and_debris(tmp_path):
    parent = tmp_path / "p"
    path = parent / "adapter"
    old = os.umask(0o027)
    try:
        save_adapter(adapted("old"), path)
        save_adapter(adapted("new"), path)
    finally:
        os.umask(old)
    assert_clean(parent, path)
    version = path / os.readlink(path / CURRENT)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((version / name).stat().st_mode) == 0o640, name  # 0o666 & ~0o027, not 0600
        assert os.readlink(path / name) == f"{CURRENT}/{name}"
    assert stat.S_IMODE(version.stat().st_mode) == 0o750
    assert loaded_identity("save", path) == "new"


def test_legacy_plain_files_are_adopted_and_debris_removed(tmp_path):
    parent = tmp_path / "p"
    path = parent / "adapter"
    parent.mkdir()
    save_adapter(adapted("old"), tmp_path / "source")
    make_legacy(path, tmp_path / "source")
    (path / "README.md").write_text("kept")
    (parent / ".adapter.loraxs-tmp-0123").mkdir()  # a sibling build folder of a crashed first save
    assert loaded_identity("save", path) == "old"
    save_adapter(adapted("new"), path)
    assert loaded_identity("save", path) == "new"
    assert (path / "README.md").read_text() == "kept"  # files that are not the adapter's are left alone
    (path / "README.md").unlink()
    assert_clean(parent, path)


def test_refused_save_changes_nothing(tmp_path):
    path = tmp_path / "adapter"
    save_adapter(adapted("old"), path)
    before = {p.name: (os.readlink(p) if p.is_symlink() else None) for p in path.iterdir()}
    broken = adapted("new")
    with torch.no_grad():
        broken[2].lora_R[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.lora_R has NaN"):
        save_adapter(broken, path)
    after = {p.name: (os.readlink(p) if p.is_symlink() else None) for p in path.iterdir()}
    assert after == before
    assert loaded_identity("save", path) == "old"


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_adapter(adapted("old"), target)
    assert target.read_text() == "not a folder"


def test_save_into_the_empty_working_directory(tmp_path, monkeypatch):
    # An empty folder is normally replaced whole by one rename; the working directory must not be
    # (the process would be left in a deleted folder): it is filled in place.
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    save_adapter(adapted("new"), ".")
    assert Path(os.getcwd()).exists() and os.path.samefile(os.getcwd(), tmp_path / "here")
    assert loaded_identity("save", Path(".")) == "new"
    assert_clean(tmp_path, tmp_path / "here")


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    # Each save's cleanup removes every version but its own: without the flock a save could delete
    # another's version folder before that one switched to it. Threads open their own descriptors,
    # and flock locks are per open file description, so threads contend as processes would.
    import threading

    parent = tmp_path / "p"
    path = parent / "adapter"
    models = {w: adapted(w) for w in ("old", "new")}
    errors = []

    def saver(which):
        try:
            for _ in range(5):
                save_adapter(models[which], path)
        except Exception as e:  # noqa: BLE001  collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(w,)) for w in ("old", "new", "old", "new")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert loaded_identity("save", path) in ("old", "new")
    assert_clean(parent, path)
