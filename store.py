"""store.py: files that are whole or absent, and states that load without running code.

A directory is written whole into a temporary sibling, flushed to disk, then put in place by one
rename (`commit_dir`), or published as a new version behind a symbolic link (`commit_link`, the
checkpoints). A nested state (optimizer and filter state dicts) is stored as safetensors + JSON
(`save_state`), never pickled: a pickle runs code when it is loaded. `crash_point` is the test hook
that kills a process at a named moment (tests/test_reliability.py).
"""
import hashlib
import json
import os
import shutil
import sys
import signal
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Save / load: safetensors and JSON only, nothing pickled (a pickle runs code when loaded). A directory
# is written whole into a temporary sibling, flushed to disk, then put in place by one rename.

def crash_point(name: str):
    """Test hook: with LADA_CRASH_AT=name[:n] in the environment the process SIGKILLs itself the n-th
    time (default 1) it passes `name` (tests/test_reliability.py kills runs at unlucky moments)."""
    want = os.environ.get("LADA_CRASH_AT")
    if not want or want.split(":")[0] != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int((want.split(":") + ["1"])[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts = {}


def atomic_dir(path):
    """A fresh temporary directory beside `path` (named .NAME.*, never read by a loader); `commit_dir`
    or `commit_link` puts it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _fsync_tree(root: Path):
    """Flush every file of `root`, then its directories, so a rename that follows never publishes
    data still in flight (after a process kill the page cache survives anyway; this covers a power cut)."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def _fsync_dir(d):
    fd = os.open(str(d), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: Path, path):
    """Put the finished directory `tmp` at `path` by one rename: a reader sees the whole directory or
    none. Meant for write-once entries (the warm-up cache): an existing finished `path` is replaced in
    two renames, between which `path` is absent for a moment, never half written."""
    path = Path(path)
    _fsync_tree(tmp)
    crash_point("commit_dir")
    try:
        os.rename(tmp, path)  # atomic where `path` does not exist (or is an empty directory)
    except OSError:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / "x")
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def commit_link(tmp: Path, path, version: str):
    """Put the finished directory `tmp` in place as `NAME.VERSION` beside `path` and make `path` a
    symbolic link to it. The switch is one rename of a fresh link over the old one (atomic on POSIX),
    so `path` always names a whole directory, the old one or the new one. Afterwards every other
    NAME.* version and any leftover temporary .NAME.* directory (from a write that was killed) is
    removed; they were never pointed to."""
    path = Path(path)
    final = path.with_name(f"{path.name}.{version}")
    if final.exists() and final.resolve() == path.resolve():  # the version in use: never overwrite it
        final = path.with_name(f"{path.name}.{version}.{tmp.name.rsplit('.', 1)[-1]}")
    if final.exists():  # a version written by a killed run and never pointed to
        shutil.rmtree(final)
    _fsync_tree(tmp)
    os.rename(tmp, final)
    crash_point("commit_link")  # the new version is in place, the link still names the old one
    link = path.with_name(f".{path.name}.link")
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(final.name, link)
    if path.is_dir() and not path.is_symlink():  # a directory written by an older version of this code
        os.replace(path, path.with_name(f"{path.name}.legacy"))
    os.replace(link, path)
    _fsync_dir(path.parent)
    crash_point("commit_link_done")
    remove_stale(path)


def remove_temps(path):
    """Remove the temporary .NAME.* directories that killed writes of `path` (atomic_dir) left. Only for a
    caller that holds `path`'s lock, so no live writer's directory is among them."""
    path = Path(path)
    for p in path.parent.glob(f".{path.name}.*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def remove_stale(path):
    """Remove what `commit_link` left beside the link `path` that it no longer points to: older
    NAME.* versions and temporary .NAME.* directories of writes that were killed."""
    path = Path(path)
    keep = path.resolve() if path.is_symlink() else None
    for p in path.parent.iterdir():
        stale = p.name.startswith(f"{path.name}.") or p.name.startswith(f".{path.name}.")
        if stale and p.resolve() != keep and p.name != f"{path.name}.legacy":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()


def _encode(state):
    """(tree, tensors): a nested state (dicts, lists, tuples, numbers, strings, None, tensors) as a JSON
    tree whose tensors are replaced by {"__tensor__": key}, and those tensors by key."""
    tensors = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            if not all(isinstance(k, (str, int, float, bool)) or k is None for k in x):
                raise TypeError(f"save_state: unsupported dict key type {type(next(iter(x))).__name__}")
            return {"__dict__": [[k, enc(v)] for k, v in x.items()]}  # int keys (optimizer states) kept as ints
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_state: cannot store a {type(x).__name__}")

    return enc(state), tensors


class StateError(ValueError):
    """A state file that is not what `save_state` writes (damaged, or crafted)."""


def _decode(tree, tensors, where: str, sf: str):
    """The state `_encode` took apart; StateError naming `where` (the tree's file) if it is anything else."""
    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                if x["__tensor__"] not in tensors:
                    raise StateError(f"{where}: refers to tensor {x['__tensor__']!r}, absent from {sf}")
                return tensors[x["__tensor__"]]
            if set(x) == {"__tuple__"} and isinstance(x["__tuple__"], list):
                return tuple(dec(v) for v in x["__tuple__"])
            if set(x) == {"__dict__"} and isinstance(x["__dict__"], list):
                pairs = x["__dict__"]
                if not all(isinstance(p, list) and len(p) == 2 and not isinstance(p[0], (list, dict)) for p in pairs):
                    raise StateError(f"{where}: malformed key-value list")
                return {k: dec(v) for k, v in pairs}
            if any(k.startswith("__") for k in x):
                raise StateError(f"{where}: unknown entry {sorted(x)[0]!r}")
            return {k: dec(v) for k, v in x.items()}
        return x

    try:
        return dec(tree)
    except RecursionError:
        raise StateError(f"{where}: nested too deeply") from None


def _read_safetensors(sf: Path):
    """(tensors, header metadata) of a safetensors file, in one read; StateError if it is not one."""
    try:
        with safe_open(str(sf), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StateError(f"{sf}: not a safetensors file ({str(e).splitlines()[0][:100]})") from None


def _parse_tree(text: str, where):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{where}: not valid JSON ({str(e).splitlines()[0][:100]})") from None


def save_state(state, path):
    """A nested state (dicts, lists, tuples, numbers, strings, None, tensors: optimizer and filter
    state dicts) as PATH.safetensors (the tensors) and PATH.json (everything else, tensors replaced by
    {"__tensor__": key}). `load_state` builds only these types back: nothing it reads can run code."""
    path = Path(path)
    tree, tensors = _encode(state)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(tree))


def load_state(path):
    """The state `save_state(state, PATH)` wrote; StateError if the files are anything else."""
    path = Path(path)
    js, sf = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for f in (js, sf):
        if not f.is_file():
            raise StateError(f"{f}: missing")
    tree = _parse_tree(js.read_text(encoding="utf-8"), js)
    return _decode(tree, _read_safetensors(sf)[0], js, sf.name)


def save_state_file(state, path):
    """The same state in one safetensors file, the JSON tree in its header's metadata, written beside
    `path` and put in place by one rename: a reader finds the old state or the new one, whole."""
    path = Path(path)
    tree, tensors = _encode(state)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(tree)})
    os.replace(tmp, path)


def load_state_file(path):
    """The state `save_state_file` wrote; StateError if the file is anything else."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: missing")
    tensors, meta = _read_safetensors(path)
    if "state" not in meta:
        raise StateError(f"{path}: no state in its metadata")
    return _decode(_parse_tree(meta["state"], path), tensors, path, path.name)


# -----------------------------------------------------------------------------
# Checksums (a checkpoint's manifest) and a folder's owner (a run's lock)

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path):
    """d/manifest.json: the SHA-256 of every file under d (what `check_manifest` checks)."""
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
    (d / MANIFEST).write_text(json.dumps({p.relative_to(d).as_posix(): sha256(p) for p in files}, indent=1))


def check_manifest(ck: Path, required: bool = False):
    """Every file the directory's manifest lists is there with its SHA-256 (StateError naming the first
    that is not); a checkpoint of an older version without a manifest is loaded with a warning, unless
    the manifest is `required` (then that is a StateError too)."""
    man = ck / MANIFEST
    if not man.is_file():
        if required:
            raise StateError(f"{man}: missing")
        print(f"{ck}: no {MANIFEST} (written by an older version): its files are not checked", file=sys.stderr)
        return
    try:
        listed = json.loads(man.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        listed = None
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise StateError(f"{man}: not a map of files to SHA-256 sums")
    for rel, want in listed.items():
        p = ck / rel
        if ".." in Path(rel).parts or not p.is_file():
            raise StateError(f"{p}: listed in {MANIFEST} but missing")
        if sha256(p) != want:
            raise StateError(f"{p}: its SHA-256 differs from the one written with it (the file is damaged)")


def _started(pid: int):
    """A process's start time (Linux: /proc), so a lock names its process even after its pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _started(pid) == started


def lock_out(out: Path):
    """Take out/.lock for this process (its pid and start time): a run owns its folder. A lock of a live
    process is refused with one line naming it; one of a process that is gone is taken over, with a line.
    Returns the function that releases it (called when the run ends, also by an error)."""
    lock, me = out / ".lock", {"pid": os.getpid(), "started": _started(os.getpid())}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, started = int(holder["pid"]), holder.get("started")
            except (OSError, ValueError, KeyError, TypeError):
                pid, started = None, None
            if pid is not None and pid != os.getpid() and _alive(pid, started):
                raise ValueError(f"{out} is in use by process {pid} (its lock {lock}); wait for it to end, or choose another --out")
            print(f"{out}: taking over the lock of process {pid}, which is gone", file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))

        def release():
            try:
                if json.loads(lock.read_text()).get("pid") == me["pid"]:
                    lock.unlink()
            except (OSError, ValueError):
                pass
        return release
    raise ValueError(f"{lock}: cannot be taken (another process takes it at the same moment); try again")
