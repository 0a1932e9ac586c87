"""The run directory: paths, atomic writes, the config history, the run lock, and which phases are
complete. Its layout and every file in it are documented once, in docs/formats.md ("The run
directory"); what a resume checks is in docs/resume.md (harness/fingerprint.py).

A phase whose output is complete is never redone on resume; a phase started with another config is
an error before any work. Every write is atomic (a temporary file named `.<name>.*` renamed into
place) except the trees.jsonl appends, whose half-written last line is dropped on resume;
`remove_stale_temps` deletes what an interrupted write left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.machine import machine_info

log = logging.getLogger(__name__)


def _publish(tmp: str, path: Path) -> None:
    """Rename the finished temporary `tmp` onto `path`, with the permissions a plain open() would give
    (mkstemp makes it private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """The project's one atomic writer: `text` to a temporary file in the same folder, then a rename,
    so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished folder `new` (beside `out`) to `out`, with the permissions a plain mkdir would
    give (mkdtemp makes it private). An older `out` is moved aside first and deleted after, so `out` is
    never a half-written folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(new, 0o777 & ~mask)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


@contextlib.contextmanager
def publish_dir(out: Path) -> Iterator[Path]:
    """The project's one way to write a folder atomically: yields an empty temporary folder beside `out`
    (`.<name>.tmp-*`, which `remove_stale_temps` deletes after a crash) to build in; when the block ends
    without error it replaces `out` (`replace_dir`); on an error it is deleted and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, atomically (write_text_atomic)."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def truncate_partial_line(path: Path) -> bool:
    """Drop a half-written last line (no trailing newline, left by a crash) so appends stay valid.
    Returns whether the file exists."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted run",
                    path, len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)
    return True


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class RoundDir:
    path: Path

    @property
    def trees(self) -> Path:
        return self.path / "trees.jsonl"

    @property
    def search_done(self) -> Path:
        return self.path / "search.json"

    @property
    def pairs(self) -> Path:
        return self.path / "pairs.jsonl"

    @property
    def policy(self) -> Path:
        return self.path / "policy"

    @property
    def value_data(self) -> Path:
        return self.path / "value.jsonl"

    @property
    def value(self) -> Path:
        return self.path / "value"

    @property
    def train(self) -> Path:
        return self.path / "train.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def compute(self) -> Path:
        return self.path / "compute.json"

    @property
    def fingerprints(self) -> Path:
        return self.path / FINGERPRINTS

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def policy_complete(self) -> bool:
        return (self.policy / "config.json").is_file() and self.train.is_file()


def round_dir(run_dir: Path, k: int) -> RoundDir:
    return RoundDir(Path(run_dir) / f"round_{k}")


FINGERPRINTS = "fingerprints.json"  # harness/fingerprint.py reads and writes it
HISTORY = "configs"




def write_config(run_dir: Path, text: str, *, now: float | None = None, machine: dict | None = None) -> Path:
    """This invocation's resolved config: config.yaml (the latest) and a numbered copy in configs/
    (the history, oldest first), with the machine it ran on beside it (`<entry>.machine.json`,
    harness/machine.py; `machine` defaults to this one's). Returns the history file."""
    run_dir = Path(run_dir)
    history = run_dir / HISTORY
    history.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name.split("-", 1)[0]) for p in history.glob("*.yaml") if p.name.split("-", 1)[0].isdigit()),
                default=0)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
    entry = history / f"{n:04d}-{stamp}.yaml"
    write_text_atomic(entry, text)
    write_json_atomic(entry.with_suffix(".machine.json"), machine if machine is not None else machine_info())
    write_text_atomic(run_dir / "config.yaml", text)
    return entry


def round_config(run_dir: Path, k: int) -> Path:
    """The config file that produced round k: round_<k>/config.yaml (written by the invocation that
    last worked on the round; every key that decides a finished phase is the same in all of them,
    harness/fingerprint.py), else the run's config.yaml (a run from before per-round configs)."""
    path = round_dir(run_dir, k).config
    return path if path.is_file() else Path(run_dir) / "config.yaml"


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete what interrupted writes left: `.<name>.*` temporaries of atomic writes, `.policy.tmp-*`
    half-saved checkpoints and `.policy.job-*` training jobs (policy/dpo.py) in initial/, round_*/ and
    configs/, and the run directory's own `.config.yaml.*`/`.metrics.jsonl.*`. Only call it while
    holding the run directory (`owned`): another invocation's files in progress look the same."""
    run_dir = Path(run_dir)
    folders = [run_dir / "initial", run_dir / HISTORY, *sorted(run_dir.glob("round_*"))]
    stale = [p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.name.startswith(".")]
    stale += [p for name in ("config.yaml", "metrics.jsonl") for p in run_dir.glob(f".{name}.*")]
    for path in stale:
        log.warning("%s: removing a temporary left by an interrupted run", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


ROUND0_SEARCH_FILES = ("trees.jsonl", "search.json", "pairs.jsonl")
"""What `copy_round0_search` copies from round_0: the finished search and its pairs."""


COPIED_PHASES = {"initial/eval.json": ("initial", "eval"), "round_0/trees.jsonl": ("round_0", "search"),
                 "round_0/search.json": ("round_0", "search"), "round_0/pairs.jsonl": ("round_0", "pairs")}
"""The folder and phase (harness/fingerprint.py) of each file `copy_round0_search` copies."""


def copy_round0_search(source: Path, run_dir: Path, *, must_match: dict[str, Any]) -> list[str]:
    """Copy a finished run's initial evaluation and round-0 search (trees, search.json, pairs) into
    `run_dir` where they are missing, so that this run resumes from them and only trains and
    evaluates: runs given the same source train on the same pairs by construction. The copied
    phases' fingerprints come along (marked "copied": they are compared without run.seed), written
    before the files, as a phase's are before its output.

    `must_match`: resolved config values (dotted keys) the source's round-0 config must hold too (the
    task, the problems per round, the pair extraction); a difference, a missing source or an
    unfinished round-0 search raise ValueError naming it. Returns the paths copied (relative)."""
    from omegaconf import OmegaConf

    source = Path(source)
    if source.resolve() == Path(run_dir).resolve():
        return []  # the source run itself (the first job of a sweep whose other jobs copy from it)
    config_path = round_config(source, 0)
    if not config_path.is_file():
        raise ValueError(f"run.search_from={source}: no config.yaml there (not a run directory)")
    missing = [f"round_0/{n}" for n in ROUND0_SEARCH_FILES if not (source / "round_0" / n).is_file()]
    if missing:
        raise ValueError(f"run.search_from={source}: its round-0 search is not finished ({', '.join(missing)} missing)")
    config = OmegaConf.load(config_path)

    def lookup(key: str) -> Any:
        value = OmegaConf.select(config, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    differ = [f"{k}: {lookup(k)!r} there, {v!r} here" for k, v in must_match.items() if lookup(k) != v]
    if differ:
        raise ValueError(f"run.search_from={source}: its config differs: " + "; ".join(differ))
    todo = [rel for rel in ["initial/eval.json", *(f"round_0/{n}" for n in ROUND0_SEARCH_FILES)]
            if (source / rel).is_file() and not (Path(run_dir) / rel).exists()]
    for folder in sorted({COPIED_PHASES[rel][0] for rel in todo}):
        src_fp, dst_fp = source / folder / FINGERPRINTS, Path(run_dir) / folder / FINGERPRINTS
        theirs = read_json(src_fp) if src_fp.is_file() else {}
        ours = read_json(dst_fp) if dst_fp.is_file() else {}
        phases = [p for rel, (f, p) in COPIED_PHASES.items() if f == folder and rel in todo and p in theirs]
        if phases:
            ours.update({p: theirs[p] for p in phases})
            ours["copied"] = sorted({*ours.get("copied", []), *phases})
            write_json_atomic(dst_fp, ours)
    for rel in todo:
        src, dst = source / rel, Path(run_dir) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.copy")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return todo


# --- one invocation per run directory, and what a killed one left running -------------------------

LOCK = ".lock"


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, start time in clock ticks, parent) of a process, from /proc; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2]), int(fields[19]), int(fields[1])


def _ancestors(pid: int) -> set[int]:
    out = {pid}
    while (st := _stat(pid)) is not None and st[3] > 1 and st[3] not in out:
        pid = st[3]
        out.add(pid)
    return out


def _running(pid: int, start: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX" and (start is None or st[2] == start)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()] if Path("/proc").is_dir() else []


def leftover_processes(run_dir: Path, owner: dict | None) -> list[int]:
    """Processes a killed invocation of this run directory left running (Linux /proc): those holding
    its lock file open (children forked by the engine, e.g. vLLM's EngineCore, inherit it), DPO
    training jobs (`python -m policy.train_main <run_dir>/round_k/.policy.job-*.json`), and, when the
    killed invocation led its own process group, the rest of that group. Never this process."""
    run_dir = Path(run_dir).resolve()
    lock = run_dir / LOCK
    mine = _ancestors(os.getpid())
    since = int(owner.get("start", 0)) if owner else 0
    dead_leader = (owner is not None and owner.get("pid") == owner.get("pgid") and owner.get("pid") not in mine
                   and not _running(owner["pid"], owner.get("start")))
    found = []
    for pid in _pids():
        st = _stat(pid)
        if pid in mine or st is None or st[0] in "ZX":
            continue
        try:
            holds = any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == str(lock) for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            holds = False
        args = _cmdline(pid)
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            cwd = Path("/")
        job = "policy.train_main" in args and any(
            a.endswith(".json") and run_dir in (cwd / a).resolve().parents for a in args)
        group = dead_leader and st[1] == owner["pid"]
        if holds or ((job or group) and st[2] >= since):
            found.append(pid)
    return found


def _kill(pids: list[int], run_dir: Path) -> None:
    for pid in pids:
        log.warning("%s: killing process %d left running by an interrupted invocation: %s", run_dir, pid,
                    " ".join(_cmdline(pid))[:200])
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)


def _owner_record() -> dict:
    st = _stat(os.getpid())
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "start": st[2] if st else 0,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


@contextlib.contextmanager
def owned(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this invocation (an exclusive flock on `.lock`, which names the holder).
    A second invocation on the same directory while one runs raises ValueError naming its pid. A
    killed invocation's leftover processes (`leftover_processes`) are killed first, so that no
    orphan keeps writing into the run directory while this one resumes it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            owner = json.loads(path.read_text() or "null")
        except ValueError:
            owner = None

        def lock() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        got = lock()
        if not got and owner and _running(owner["pid"], owner.get("start")):
            raise ValueError(f"{run_dir} is in use by another invocation (pid {owner['pid']}, started "
                             f"{owner.get('started')}): wait for it to finish or stop it")
        _kill(leftover_processes(run_dir, owner), run_dir)
        if not got:
            deadline = time.time() + 10
            while not (got := lock()) and time.time() < deadline:
                time.sleep(0.1)
            if not got:
                raise ValueError(f"{run_dir}/{LOCK} is held by processes this invocation could not stop: "
                                 f"see `fuser {path}`")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_owner_record()) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)
