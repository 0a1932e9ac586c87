"""Run untrusted, model-written Python programs (ToRA's tool steps) each in its own throwaway process.

`run_program(code, cfg)` runs one program and returns an `ExecResult`; `run_programs(codes, cfg)` runs
many on `cfg.workers` threads, results in input order; neither raises for a bad program. ToRA's
convention (microsoft/ToRA, `src/utils/python_executor.py`): the program prints its result; on an
exception the report is the last line of the traceback. The output here is the whole stdout (ToRA keeps
its last line). `tools.format.sanitize_output` is the caller's business.

What one call does (as root, on a Linux machine that allows it; `isolation_report(cfg)` says what
applied here):

- a per-call cgroup (v1 `pids` and `memory` hierarchies, where writable): `pids.max` bounds processes
  and threads, `memory.limit_in_bytes` the memory of everything the program starts; the cgroup is also
  how every process of the call is found and SIGKILLed at the end, children and double-forked
  grandchildren included;
- `sys.executable -I -S -c <launcher>`, started with an empty environment in a new session; the
  launcher (running as root, before any program code) moves into new mount, network, pid, IPC and UTS
  namespaces: the network namespace is new and empty (no interface is up, not even loopback, so no
  connection anywhere, 127.0.0.1 included); the program is pid 2 under the launcher's init (pid 1), sees
  only its own processes in a fresh /proc, and dies with the namespace when it exits or is killed;
- in the mount namespace every mount is remounted read-only (nosuid), then a fresh tmpfs is mounted
  on /tmp (owned by the program's uid; it is the working directory and vanishes with the namespace) and
  on /dev/shm; directories the unprivileged uid may not traverse on the way to the interpreter (here
  /root, where pyenv lives) are covered by an empty read-only tmpfs with only the interpreter's tree
  bind-mounted back, read-only;
- rlimits on CPU seconds, address space, file size and core size, then setgroups([]), setresgid and
  setresuid to `cfg.uid` (nobody) and no_new_privs; os.environ emptied; the caller's site-packages put
  on sys.path (no .pth file is run: a start costs 13 ms of CPU instead of 38 with `site`; the whole
  call ~30, docs/sandbox.md);
- the program text arrives on stdin and runs in that process (`exec` of its code as `__main__`);
  stdout is read up to `max_capture_bytes` (more kills the program: error "output_limit") and cut to
  `max_output_chars` with TRUNCATION_MARKER in the middle; the wall clock is the caller's: at
  `timeout_s` every process of the call is SIGKILLed.

Each piece degrades on its own, with ONE logged warning for all that is missing (found by a probe
program on first use): no cgroup -> the process group (with the pid namespace's init in it) is
killed, processes are bounded by RLIMIT_NPROC of the sandbox uid (`max_processes * workers + 2`, shared
by the concurrent programs); no pid namespace -> /proc shows every process, and concurrent programs
(one uid) may signal each other; without cgroup and pid namespace a grandchild that calls setsid()
escapes the kill; no mount namespace -> a fresh directory under the system temp dir (removed
afterwards) is the working directory and the program may write wherever the sandbox uid may (/tmp,
/var/tmp, /dev/shm); where the interpreter then lies beyond the uid's reach (here, under /root) the uid
change goes too and the program runs as root; no network namespace -> the network is open; not root
-> no namespaces and no uid change: the program runs as the caller's user.

What it does NOT isolate: it is not a security boundary against kernel exploits (one shared kernel,
no seccomp filter); CPU is shared with the caller (two cores here; no CPU cgroup or nice); everything
world-readable stays readable (the repository, /etc, /proc/sys, /sys); Unix sockets on the file system
whose permissions allow "other" stay connectable (the network namespace covers abstract sockets only);
the kernel's session keyring is inherited (empty here). A stronger isolation goes behind the same interface with
`command_prefix`, e.g. `("bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev",
"/dev", "--proc", "/proc", "--bind", "{workdir}", "{workdir}", "--")`, nsjail, or `docker run ...`: the
prefix is put in front of the launcher's command line, "{workdir}" is replaced by the call's working
directory, and the launcher then does only rlimits, the working directory and the program's run (the
prefix owns namespaces and the uid); the cgroup, the wall clock and the kill stay here. The prefix must
pass stdin/stdout/stderr and one inherited file descriptor (the launcher's status pipe) through.

Command line: `python -m tools.sandbox PROGRAM.py [--timeout-s 5 ...]` prints one JSON line with ok,
output, error, seconds; `python -m tools.sandbox --report` prints `isolation_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import selectors
import shlex
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "[... output truncated ...]"  # put in the middle of a cut output (ours)
NAMESPACES = ("mnt", "uts", "ipc", "net", "pid")  # unshare order; "pid" last: the next fork is its init
FEATURES = NAMESPACES + ("proc", "uid", "cgroup")  # everything a call may apply, for isolation_report
LAUNCHER_PROCESSES = 2  # the launcher and the pid namespace's init, counted in pids.max besides the program
LAUNCHER_MB = 32  # memory cgroup room for those two above memory_mb (ours; a whole trivial call peaks at ~7 MB)
STDERR_TAIL_BYTES = 65536  # of a program's stderr only the end is kept: the traceback's last line (ours)
KILL_GRACE_S = 2.0  # longest wait for the kill of a call's processes before giving up on them (ours)
PROBE_CGROUP = dict(max_processes=1, memory_mb=64)  # the throwaway cgroup that tests writability (ours)
PROBE_FLOOR = dict(timeout_s=10.0, cpu_s=10, memory_mb=256, max_processes=4)  # the probe program's least limits (ours)
POLL_S = 0.002  # how often a wait for a process's end looks again (ours)
RMDIR_POLL_S = 0.005  # how often the removal of a call's emptied cgroup is tried again (ours)
_TOKEN = "mctsloop-sandbox"  # names the per-call cgroups and work dirs


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program (config keys `tool.sandbox.<field>`, conf/tool/python.yaml)."""

    timeout_s: float = 5.0  # wall clock per program (ToRA: 5 s)
    cpu_s: int = 5  # RLIMIT_CPU seconds: SIGXCPU, SIGKILL one second later (ours: ToRA's 5 s as CPU time)
    memory_mb: int = 512  # RLIMIT_AS per process and the call's memory cgroup limit (ours)
    max_processes: int = 8  # processes/threads the program may have (cgroup pids.max where writable) (ours)
    max_file_mb: int = 8  # RLIMIT_FSIZE (ours)
    max_output_chars: int = 400  # output cut to this, head and tail around TRUNCATION_MARKER (ToRA: 400)
    network: bool = False  # False: no network (a new, empty network namespace where the machine allows it)
    workers: int = 2  # programs run in parallel by run_programs (ours: the machine's two cores)
    max_capture_bytes: int = 1_000_000  # stdout beyond this kills the program: error "output_limit" (ours)
    uid: int = 65534  # the unprivileged uid and gid programs run as when the caller is root (ours: nobody)
    site_packages: bool = True  # the caller's site-packages on the program's sys.path, no .pth files (ours)
    command_prefix: tuple[str, ...] = ()  # a stronger sandbox's command put in front; "{workdir}" substituted (ours)

    def __post_init__(self):
        if isinstance(self.command_prefix, (list, tuple)):
            object.__setattr__(self, "command_prefix", tuple(str(a) for a in self.command_prefix))
        else:
            raise ValueError(f"tool.sandbox.command_prefix must be a list of strings, got {self.command_prefix!r}")
        positive = {"timeout_s": self.timeout_s, "cpu_s": self.cpu_s, "memory_mb": self.memory_mb,
                    "max_processes": self.max_processes, "workers": self.workers,
                    "max_capture_bytes": self.max_capture_bytes}
        for key, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"tool.sandbox.{key} must be a positive number, got {value!r}")
        for key in ("cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_output_chars", "workers",
                    "max_capture_bytes", "uid"):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise ValueError(f"tool.sandbox.{key} must be an integer, got {getattr(self, key)!r}")
        if self.memory_mb < 32:
            raise ValueError(f"tool.sandbox.memory_mb must be at least 32 (for the interpreter), got {self.memory_mb}")
        if self.max_file_mb < 0:
            raise ValueError(f"tool.sandbox.max_file_mb must be >= 0, got {self.max_file_mb}")
        if self.max_output_chars < 2 * len(TRUNCATION_MARKER):
            raise ValueError(f"tool.sandbox.max_output_chars must be at least {2 * len(TRUNCATION_MARKER)}, "
                             f"got {self.max_output_chars}")
        if self.max_capture_bytes < self.max_output_chars:
            raise ValueError(f"tool.sandbox.max_capture_bytes ({self.max_capture_bytes}) must be >= "
                             f"tool.sandbox.max_output_chars ({self.max_output_chars})")
        if not 0 < self.uid < 2**32 - 1:
            raise ValueError(f"tool.sandbox.uid must be a non-root uid, got {self.uid}")
        if not isinstance(self.network, bool) or not isinstance(self.site_packages, bool):
            raise ValueError("tool.sandbox.network and tool.sandbox.site_packages must be true or false")


@dataclass(frozen=True)
class ExecResult:
    """What became of one program."""

    ok: bool  # the program exited 0 within its limits
    output: str  # stdout (truncated) when ok; else the last line of the error
    error: str | None  # None when ok; else "exception", "timeout", "memory", "output_limit", "killed", "sandbox"
    seconds: float  # wall time of the call


def truncate_output(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters: its head and its tail around TRUNCATION_MARKER (the tail
    usually holds a ToRA program's printed answer)."""
    if len(text) <= limit:
        return text
    keep = limit - len(TRUNCATION_MARKER) - 2
    head = keep // 2
    return text[:head] + "\n" + TRUNCATION_MARKER + "\n" + text[len(text) - (keep - head):]


# --------------------------------------------------------------------------------------------------
# The launcher: run as `python -I -S -c _LAUNCHER`, reads its plan and the program from stdin. Three
# processes: the launcher (waits), init (pid 1 of the new pid namespace: sets up mounts, reaps, reports
# the program's wait status) and the program. It reports on the status pipe: "init <pid>", "ok" (the
# program is about to run), "status <wait status>", "fail <step>: <why>", "warn <what>".
_LAUNCHER = r'''# mctsloop-sandbox launcher
import ctypes, os, sys
def _launch():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    PDEATHSIG, NO_NEW_PRIVS, SIGKILL = 1, 38, 9
    libc.prctl(PDEATHSIG, SIGKILL, 0, 0, 0)  # the caller dies (even SIGKILLed): so does the call
    raw = sys.stdin.buffer.read()
    head, _, src = raw.partition(b"\n\n")
    plan = {}
    for line in head.decode("utf-8").split("\n"):
        key, _, value = line.partition("=")
        plan.setdefault(key, []).append(value)
    def one(key, default=""):
        return plan.get(key, [default])[0]
    status = int(one("status_fd"))
    def say(text):
        os.write(status, (text + "\n").encode("utf-8", "replace"))
    def fail(step, why):
        say("fail %s: %s" % (step, why))
        os._exit(125)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.umask(0o022)
    features = set(one("features").split(",")) - {""}
    def check(step, result):
        if result != 0:
            fail(step, os.strerror(ctypes.get_errno()))
    def mount(step, source, target, fstype, flags, data=None, strict=True):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            why = os.strerror(ctypes.get_errno())
            if strict:
                fail("%s %s" % (step, target), why)
            say("warn %s %s: %s" % (step, target, why))
    clone = {"mnt": 0x20000, "uts": 0x4000000, "ipc": 0x8000000, "net": 0x40000000, "pid": 0x20000000}
    for name in ("mnt", "uts", "ipc", "net", "pid"):
        if name in features:
            check("unshare-" + name, libc.unshare(clone[name]))
    init = os.fork()
    if init:
        say("init %d" % init)
        os.close(status)
        _, wstatus = os.waitpid(init, 0)
        os._exit(os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else 128 + os.WTERMSIG(wstatus))
    libc.prctl(PDEATHSIG, SIGKILL, 0, 0, 0)  # init: with the launcher
    if "mnt" in features:
        RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 8192, 16384, 1 << 18
        mount("mount-private", None, "/", None, REC | PRIVATE)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split(" ") for line in f]
        for fields in mounts:
            target = fields[4]
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                target = target.replace(code, char)
            options = fields[5].split(",")
            flags = REMOUNT | BIND | RDONLY | NOSUID
            flags |= (NODEV if "nodev" in options else 0) | (NOEXEC if "noexec" in options else 0)
            mount("read-only", None, target, None, flags, strict=target == "/")
        uid, size = one("tmp_uid"), one("tmp_mb")
        tmp_options = "mode=0700,uid=%s,gid=%s,size=%sm" % (uid, uid, size)
        mount("mount-tmp", "tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, tmp_options)
        for i, item in enumerate(plan.get("expose", [])):
            hidden, *keeps = item.split("\t")
            staged = []
            for j, keep in enumerate(keeps):
                stage = "/tmp/.expose-%d-%d" % (i, j)
                os.mkdir(stage, 0o700)
                mount("expose", keep, stage, None, BIND | REC)
                staged.append((stage, keep))
            mount("expose", "tmpfs", hidden, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
            for stage, keep in staged:
                os.makedirs(keep, 0o755, exist_ok=True)
                mount("expose", stage, keep, None, MOVE)
                os.rmdir(stage)
                mount("expose", None, keep, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
            mount("expose", None, hidden, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
        if os.path.isdir("/dev/shm"):
            mount("mount-shm", "tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV | NOEXEC, "mode=1777,size=%sm" % size)
        if "proc" in features:
            mount("mount-proc", "proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    init_pid = os.getpid()
    program = os.fork()
    if program:
        while True:
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                os._exit(0)
            if pid == program:
                say("status %d" % wstatus)
                os._exit(0)
    try:
        os.chdir(one("cwd"))
        import resource
        for item in plan.get("rlimit", []):
            name, soft, hard = item.split(":")
            resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))
    except (OSError, ValueError) as exc:
        fail("limits", exc)
    if "uid" in features:
        uid = int(one("uid"))
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            fail("uid", exc)
        check("uid-no-new-privs", libc.prctl(NO_NEW_PRIVS, 1, 0, 0, 0))
    libc.prctl(PDEATHSIG, SIGKILL, 0, 0, 0)  # with init (a uid change clears it, hence here)
    if os.getppid() != init_pid:  # init died before that
        os._exit(137)
    os.environ.clear()
    sys.path[:] = [p for p in sys.path if p] + plan.get("site", [])
    sys.argv[:] = [""]
    sys.dont_write_bytecode = True
    say("ok")
    os.close(status)
    import builtins, types
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(src, "<program>", "exec"), main.__dict__)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException as exc:
        import traceback
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<program>":
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        code = 1
    # what the interpreter's exit does first (wait for threads, atexit, flush), without its slow teardown
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120
    os._exit(code & 0xFF)
_launch()
'''

# The probe program: what a program sees, for isolation_report and to find what works on this machine.
_PROBE = r'''
import fractions, decimal, json, os, socket
facts = {"uid": os.getuid(), "pid": os.getpid(), "environ": sorted(os.environ), "cwd": os.getcwd(),
         "interfaces": sorted(name for _, name in socket.if_nameindex()),
         "visible_pids": len([p for p in os.listdir("/proc") if p.isdigit()]),
         "writable": [p for p in ("/", "/var/tmp", "/run/lock", "/dev/shm", "/root") if os.access(p, os.W_OK)]}
try:
    socket.create_connection(("127.0.0.1", 9), timeout=0.2).close()
    facts["loopback"] = "connected"
except OSError as exc:
    facts["loopback"] = exc.strerror or type(exc).__name__
print(json.dumps(facts))
'''


# --------------------------------------------------------------------------------------------------
# What this machine allows: probed once per (uid, site_packages, command_prefix), cached.

@dataclass(frozen=True)
class _Machine:
    features: frozenset[str]  # of FEATURES, what works here
    cgroup_bases: tuple[tuple[str, str], ...]  # (controller, directory new cgroups go under)
    expose: tuple[str, ...]  # "hidden<TAB>kept<TAB>kept...": non-traversable dirs and what is bound back
    site: tuple[str, ...]  # site-packages directories put on the program's sys.path
    warnings: tuple[str, ...]  # what did not work and why
    facts: dict  # what the probe program saw


_machines: dict[tuple, _Machine] = {}
_machines_lock = threading.Lock()
_call_ids = itertools.count()


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup_bases() -> dict[str, str]:
    """The directory of this process's own cgroup in the v1 `pids` and `memory` hierarchies."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                own[c] = path
    bases = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "cgroup":
                continue
            root, target, options = _unescape(fields[3]), _unescape(fields[4]), fields[sep + 3].split(",")
            for c in ("pids", "memory"):
                if c in options and c in own and c not in bases:
                    rel = own[c]
                    if root != "/":
                        if not rel.startswith(root):
                            continue
                        rel = rel[len(root):]
                    bases[c] = os.path.normpath(os.path.join(target, rel.lstrip("/")))
    return bases


def _remove_stale_cgroups(bases: dict[str, str]) -> None:
    """Remove the per-call cgroups a killed caller left behind (empty once its call's processes died)."""
    for base in bases.values():
        for name in os.listdir(base):
            parts = name.split("-")
            if not name.startswith(_TOKEN + "-") or len(parts) != 4 or not parts[2].isdigit():
                continue
            if not os.path.exists(f"/proc/{parts[2]}"):
                try:
                    os.rmdir(os.path.join(base, name))
                except OSError:
                    pass


def _traversable(path: str, uid: int) -> bool:
    st = os.stat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == uid:  # the sandbox's gid is its uid
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _site_dirs(cfg: SandboxConfig) -> tuple[str, ...]:
    if not cfg.site_packages:
        return ()
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    return tuple(dict.fromkeys(os.path.realpath(d) for d in dirs))


def _exposures(needed: Sequence[str], uid: int) -> tuple[str, ...]:
    """For each outermost directory on the way to a needed path that `uid` may not traverse: the
    directory and the needed paths under it (innermost ones dropped), as "hidden<TAB>kept...". """
    groups: dict[str, list[str]] = {}
    for path in needed:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not _traversable(ancestor, uid):
                groups.setdefault(ancestor, []).append(path)
                break
    out = []
    for hidden, paths in groups.items():
        paths = sorted(set(paths))
        kept = [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
        if any("\t" in p or "\n" in p for p in [hidden, *kept]):
            continue
        out.append("\t".join([hidden, *kept]))
    return tuple(out)


def _machine(cfg: SandboxConfig) -> _Machine:
    key = (cfg.uid, cfg.site_packages, cfg.command_prefix)
    with _machines_lock:
        if key not in _machines:
            _machines[key] = _probe(cfg)
        return _machines[key]


def _probe(cfg: SandboxConfig) -> _Machine:
    """Find out what works: the cgroups by making one, the rest by running the probe program with
    everything on and dropping what fails, one piece at a time. Logs one warning if anything is off."""
    warnings = []
    site_dirs = _site_dirs(cfg)
    root = os.geteuid() == 0
    features = set()
    if cfg.command_prefix:
        warnings.append("namespaces, mounts and the uid are left to command_prefix")
    elif root:
        features |= {"mnt", "uts", "ipc", "net", "pid", "proc", "uid"}
    else:
        warnings.append("not root: no namespaces and no uid change; the program runs as the caller's user")
    bases = {}
    try:
        bases = _cgroup_bases()
        missing = {"pids", "memory"} - set(bases)
        if missing:
            raise OSError(f"no writable v1 hierarchy for {sorted(missing)}")
        probe_cfg = dataclasses.replace(cfg, **PROBE_CGROUP)
        _CallCgroup(bases, probe_cfg).remove()
        features.add("cgroup")
        _remove_stale_cgroups(bases)
    except (OSError, ValueError) as exc:
        warnings.append(f"no per-call cgroup ({exc}): processes bounded by RLIMIT_NPROC, killed by process group")
        bases = {}
    needed = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
              *site_dirs]
    expose = _exposures([os.path.realpath(p) for p in needed], cfg.uid) if root else ()
    probe_cfg = dataclasses.replace(cfg, **{k: max(getattr(cfg, k), v) for k, v in PROBE_FLOOR.items()})
    facts: dict = {}
    machine = _Machine(frozenset(features), tuple(bases.items()), expose, site_dirs, (), {})
    for _ in range(len(FEATURES) + 1):
        machine = dataclasses.replace(machine, features=frozenset(features))
        try:
            result, report = _execute(_PROBE, probe_cfg, machine, features)
        except Exception as exc:  # e.g. no interpreter to start: every call will say so
            warnings.append(f"the sandbox cannot start a program here ({type(exc).__name__}: {exc})")
            break
        warnings.extend(w for w in report.warnings if w not in warnings)
        if result.ok:
            try:
                facts = json.loads(result.output.strip().splitlines()[-1])
            except (ValueError, IndexError):
                facts = {"output": result.output}
            break
        drop = _culprit(report.failed_step, result.error, features)
        if drop is None:
            warnings.append(f"the probe program failed ({result.output}); isolation left as it is")
            break
        warnings.append(f"no {'/'.join(sorted(drop))} ({result.output})")
        features -= drop
    machine = dataclasses.replace(machine, features=frozenset(features), warnings=tuple(warnings), facts=facts)
    if warnings:
        log.warning("sandbox isolation is reduced on this machine: %s", "; ".join(warnings))
    return machine


def _culprit(step: str | None, error: str | None, features: set[str]) -> set[str] | None:
    """The features to drop after the probe failed with `error`, the launcher at `step` (None: none)."""
    if step is None:
        if error == "exception":  # the program ran and failed: the interpreter is unusable as the sandbox uid
            return {"uid"} & features or None
        if error == "sandbox":  # the launcher never started: the cgroup join in front of it failed
            return {"cgroup"} & features or None
        return None
    if step.startswith("unshare-"):
        name = step.split("-", 1)[1].split(":")[0]
        drop = {name} | ({"proc"} if name in ("pid", "mnt") else set())
        return drop & features or None
    if step.startswith("mount-proc"):
        return {"proc"} & features or None
    if step.startswith(("mount", "read-only", "expose")):
        return {"mnt", "proc"} & features or None
    if step.startswith("uid"):
        return {"uid"} & features or None
    return None


# --------------------------------------------------------------------------------------------------
# One call.

class _CallCgroup:
    """A per-call cgroup in the v1 `pids` and `memory` hierarchies: limits, membership, kill, removal."""

    def __init__(self, bases: dict[str, str], cfg: SandboxConfig):
        self.dirs: list[str] = []
        name = f"{_TOKEN}-{os.getpid()}-{next(_call_ids)}"
        try:
            pids = self._make(bases["pids"], name)
            self._write(pids, "pids.max", cfg.max_processes + LAUNCHER_PROCESSES)
            memory = self._make(bases["memory"], name)
            limit = (cfg.memory_mb + LAUNCHER_MB) << 20
            self._write(memory, "memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                self._write(memory, "memory.memsw.limit_in_bytes", limit)
        except OSError:
            self.remove()
            raise

    def _make(self, base: str, name: str) -> str:
        path = os.path.join(base, name)
        os.mkdir(path)
        self.dirs.append(path)
        return path

    @staticmethod
    def _write(directory: str, name: str, value) -> None:
        with open(os.path.join(directory, name), "w") as f:
            f.write(str(value))

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        found = set()
        for path in self.procs_files:
            try:
                with open(path) as f:
                    found.update(int(p) for p in f.read().split())
            except OSError:
                pass
        return found

    def kill(self, proc: subprocess.Popen) -> bool:
        """SIGKILL every process in the cgroup until none is left (True), or KILL_GRACE_S passed."""
        deadline = time.monotonic() + KILL_GRACE_S
        while True:
            proc.poll()  # reap the launcher, whose zombie would stay listed
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the call at the memory limit."""
        for d in self.dirs:
            path = os.path.join(d, "memory.oom_control")
            if os.path.exists(path):
                with open(path) as f:
                    fields = dict(line.split() for line in f if line.strip())
                if "oom_kill" in fields:
                    return int(fields["oom_kill"]) > 0
                with open(os.path.join(d, "memory.failcnt")) as f:
                    return int(f.read()) > 0
        return False

    def remove(self) -> None:
        deadline = time.monotonic() + KILL_GRACE_S
        for d in reversed(self.dirs):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.debug("cgroup %s not removed: %s", d, exc)
                        break
                    time.sleep(RMDIR_POLL_S)
        self.dirs = []


@dataclass
class _Report:
    """What the launcher said on its status pipe (one line per write, see _LAUNCHER)."""

    init_pid: int | None = None  # the launcher's child, the pid namespace's init
    started: bool = False  # "ok": the program was about to run
    wait_status: int | None = None  # the program's wait status, from init
    failed_step: str | None = None
    failure: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    _pending: bytes = b""

    def feed(self, data: bytes) -> None:
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            word, _, rest = line.decode("utf-8", "replace").partition(" ")
            if word == "init" and rest.isdigit():
                self.init_pid = int(rest)
            elif word == "ok":
                self.started = True
            elif word == "status" and rest.lstrip("-").isdigit():
                self.wait_status = int(rest)
            elif word == "fail" and self.failure is None:
                self.failure = rest
                self.failed_step = rest.split(" ")[0].rstrip(":")
            elif word == "warn":
                self.warnings.append(rest)


def _plan(cfg: SandboxConfig, machine: _Machine, features: set[str], status_fd: int, workdir: str | None) -> bytes:
    """The launcher's plan: "key=value" lines, then an empty line (the program follows)."""
    rlimits = [f"RLIMIT_CPU:{cfg.cpu_s}:{cfg.cpu_s + 1}", f"RLIMIT_AS:{cfg.memory_mb << 20}:{cfg.memory_mb << 20}",
               f"RLIMIT_FSIZE:{cfg.max_file_mb << 20}:{cfg.max_file_mb << 20}", "RLIMIT_CORE:0:0"]
    if "cgroup" not in features and "uid" in features:  # RLIMIT_NPROC counts the uid's processes machine-wide
        n = cfg.max_processes * cfg.workers + LAUNCHER_PROCESSES
        rlimits.append(f"RLIMIT_NPROC:{n}:{n}")
    lines = [f"status_fd={status_fd}", f"features={','.join(sorted(features - {'cgroup'}))}",
             f"uid={cfg.uid}", f"tmp_uid={cfg.uid if 'uid' in features else 0}", f"tmp_mb={cfg.memory_mb}",
             f"cwd={workdir or '/tmp'}", *(f"rlimit={r}" for r in rlimits), *(f"site={d}" for d in machine.site)]
    if "mnt" in features and "uid" in features:
        lines += [f"expose={e}" for e in machine.expose]
    if any("\n" in line for line in lines):
        raise ValueError("a path in the sandbox plan holds a newline")
    return "\n".join(lines).encode() + b"\n\n"


def run_program(code: str, cfg: SandboxConfig) -> ExecResult:
    """Run one program under `cfg`'s limits; never raises for a bad program."""
    start = time.monotonic()
    try:
        machine = _machine(cfg)
        features = set(machine.features) - ({"net"} if cfg.network else set())
        return _execute(code, cfg, machine, features)[0]
    except Exception as exc:  # the machinery failed: say so, never harm the caller
        log.debug("sandbox failed", exc_info=True)
        _warn_once(f"the sandbox failed ({type(exc).__name__}: {exc}); such calls report error 'sandbox'",
                   key="machinery")
        return ExecResult(False, f"sandbox: {type(exc).__name__}: {exc}", "sandbox", time.monotonic() - start)


def run_programs(codes: Sequence[str], cfg: SandboxConfig) -> list[ExecResult]:
    """Run programs on `cfg.workers` threads (each program its own process); results in input order."""
    if not codes:
        return []
    try:
        _machine(cfg)  # probe once, before the threads
    except Exception:  # run_program reports it, per program
        pass
    with ThreadPoolExecutor(max_workers=min(cfg.workers, len(codes))) as pool:
        return list(pool.map(lambda c: run_program(c, cfg), codes))


def _execute(code: str, cfg: SandboxConfig, machine: _Machine, features: set[str]) -> tuple[ExecResult, _Report]:
    """Run `code` with exactly `features` on: the result and what the launcher reported."""
    start = time.monotonic()
    report = _Report()
    cgroup = workdir = proc = io = None
    fds: list[int] = []
    try:
        if "cgroup" in features:
            try:
                cgroup = _CallCgroup(dict(machine.cgroup_bases), cfg)
            except OSError as exc:
                _warn_once(f"per-call cgroup not made ({exc}); this call runs without one")
                features = features - {"cgroup"}
        if "mnt" not in features:
            workdir = tempfile.mkdtemp(prefix=f"{_TOKEN}-")
            if os.geteuid() == 0:  # the program's uid, or a command_prefix's, owns it
                os.chown(workdir, cfg.uid, cfg.uid)
        status_r, status_w = os.pipe()
        fds += [status_r, status_w]
        command = [sys.executable, "-I", "-S", "-c", _LAUNCHER]
        if cfg.command_prefix:
            command = [a.replace("{workdir}", workdir or "/tmp") for a in cfg.command_prefix] + command
        if cgroup is not None:  # join the cgroups before anything else runs, then exec the rest
            command = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
                       'shift; exec "$@"', "sh", *cgroup.procs_files, "--", *command]
        stdin = _plan(cfg, machine, features, status_w, workdir) + code.encode("utf-8", "replace")
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={}, cwd=workdir or "/", start_new_session=True, pass_fds=(status_w,))
        os.close(fds.pop())
        io = _CallIO(proc, stdin, status_r, cfg.max_capture_bytes, report)
        try:
            reason = io.run(start + cfg.timeout_s)
        finally:
            if not _kill(proc, cgroup, report):
                _warn_once("a sandboxed program's processes outlived their kill")
        io.drain()  # every writer is dead now: what is left in the pipes
        proc.wait()
        oom = cgroup is not None and cgroup.oom_killed()
        result = _classify(cfg, report, proc.returncode, io.out, io.err, reason, oom, time.monotonic() - start)
        return result, report
    finally:
        if io is not None:
            io.close()
        if proc is not None:
            if proc.poll() is None:
                _kill(proc, cgroup, report)
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        for fd in fds:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


class _CallIO:
    """The pipes of one call: feeds stdin, keeps stdout up to a cap and the end of stderr, reads the
    launcher's status pipe, and sees the launcher exit (a pidfd where the kernel has them). The launcher
    is never reaped here, so its process group id cannot be reused before the kill."""

    def __init__(self, proc: subprocess.Popen, stdin: bytes, status_r: int, cap: int, report: _Report):
        self.proc, self.stdin, self.cap, self.report = proc, stdin, cap, report
        self.out, self.err = bytearray(), bytearray()
        self.written = 0
        self.sel = selectors.DefaultSelector()
        for fd, name in ((proc.stdout.fileno(), "out"), (proc.stderr.fileno(), "err"), (status_r, "status")):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, name)
        os.set_blocking(proc.stdin.fileno(), False)
        self.sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "in")
        try:
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            self.pidfd = None

    def _exited(self) -> bool:
        try:  # WNOWAIT: look without reaping
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _reading(self) -> bool:
        return any(key.data in ("out", "err", "status") for key in self.sel.get_map().values())

    def run(self, deadline: float) -> str | None:
        """Until the launcher exits (None), `deadline` passes ("timeout") or stdout passes the cap
        ("output_limit"). After the launcher's exit, leftovers holding the pipes get 50 ms."""
        exited = False
        while not exited or self._reading():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None if exited else "timeout"
            for key, _ in self.sel.select(remaining if self.pidfd is not None else min(remaining, 0.02)):
                if key.data == "exit":
                    self.sel.unregister(key.fd)
                    exited = True
                elif key.data == "in":
                    self._write(key.fd)
                elif self._read(key) == "output_limit":
                    return "output_limit"
            if not exited and self.pidfd is None:
                exited = self._exited()
            if exited:
                deadline = min(deadline, time.monotonic() + 0.05)
        return None

    def drain(self) -> None:
        """Read what the pipes still hold; called after every process of the call is dead."""
        deadline = time.monotonic() + 1.0
        while self._reading() and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                if key.data in ("out", "err", "status"):
                    self._read(key)

    def _write(self, fd: int) -> None:
        try:
            self.written += os.write(fd, self.stdin[self.written:self.written + 65536])
        except OSError:  # the launcher is gone
            self.written = len(self.stdin)
        if self.written >= len(self.stdin):
            self.sel.unregister(fd)
            self.proc.stdin.close()

    def _read(self, key) -> str | None:
        try:
            data = os.read(key.fd, 65536)
        except BlockingIOError:
            return None
        if not data:
            self.sel.unregister(key.fd)
        elif key.data == "out":
            self.out += data
            if len(self.out) > self.cap:
                del self.out[self.cap:]
                return "output_limit"
        elif key.data == "err":
            self.err += data
            del self.err[:-STDERR_TAIL_BYTES]
        else:
            self.report.feed(data)
        return None

    def close(self) -> None:
        self.sel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)


def _kill(proc: subprocess.Popen, cgroup: _CallCgroup | None, report: _Report) -> bool:
    """SIGKILL every process of the call: the cgroup's where there is one, else the process group (with
    the pid namespace's init in it, whose death takes the whole namespace along: waited for, since init
    exits only after every other process of its namespace)."""
    if cgroup is not None:
        return cgroup.kill(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + KILL_GRACE_S
    while report.init_pid is not None and _running(report.init_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(cfg: SandboxConfig, report: _Report, returncode: int | None, out: bytes, err: bytes,
              reason: str | None, oom: bool, seconds: float) -> ExecResult:
    def failed(error: str, output: str) -> ExecResult:
        return ExecResult(False, truncate_output(output, cfg.max_output_chars), error, seconds)

    stderr = err.decode("utf-8", "replace")
    if report.failure is not None:
        return failed("sandbox", f"sandbox: {report.failure}")
    if reason == "output_limit":
        return failed("output_limit", f"OutputLimitError: the program printed more than {cfg.max_capture_bytes} bytes")
    if reason == "timeout":
        return failed("timeout", f"TimeoutError: the program ran past {cfg.timeout_s:g} s")
    oom_line = f"MemoryError: the program was killed at its memory limit ({cfg.memory_mb} MB)"
    if not report.started:
        why = _last_line(stderr)
        return failed("sandbox", f"sandbox: the launcher exited with {returncode} before the program ran"
                                 + (f" ({why})" if why else ""))
    status = report.wait_status
    if status is None:
        if oom:
            return failed("memory", oom_line)
        return failed("killed", f"killed: the sandbox's init died (launcher exit status {returncode})")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL and oom:
            return failed("memory", oom_line)
        if sig == signal.SIGXCPU:
            return failed("timeout", f"TimeoutError: the program used more than {cfg.cpu_s} s of CPU time")
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return failed("killed", f"killed: {name}")
    code = os.WEXITSTATUS(status)
    if code != 0:
        last = _last_line(stderr)
        return failed("memory" if last.startswith("MemoryError") else "exception", last or f"SystemExit: {code}")
    return ExecResult(True, truncate_output(out.decode("utf-8", "replace"), cfg.max_output_chars), None, seconds)


_warned: set[str] = set()


def _warn_once(message: str, key: str | None = None) -> None:
    """Log `message` the first time its key (default: itself) comes up in this process."""
    if (key or message) not in _warned:
        _warned.add(key or message)
        log.warning("sandbox: %s", message)


def isolation_report(cfg: SandboxConfig) -> dict:
    """What the sandbox applies on this machine for `cfg` (probing it on first use), for docs and logs."""
    machine = _machine(cfg)
    f = set(machine.features) - ({"net"} if cfg.network else set())
    return {
        "root": os.geteuid() == 0,
        "command_prefix": list(cfg.command_prefix),
        "uid_drop": cfg.uid if "uid" in f else None,
        "namespaces": {name: name in f for name in NAMESPACES},
        "network": "none (new, empty network namespace)" if "net" in f else "the machine's",
        "filesystem": ("every mount read-only; fresh tmpfs on /tmp (the work dir) and /dev/shm" if "mnt" in f else
                       "the machine's; a fresh work dir under the system temp dir"),
        "proc": "fresh /proc of the pid namespace" if "proc" in f else "the machine's /proc",
        "exposed_read_only": [e.replace("\t", " -> ") for e in machine.expose] if {"mnt", "uid"} <= f else [],
        "cgroup": dict(machine.cgroup_bases) if "cgroup" in f else None,
        "limits": {"wall_s": cfg.timeout_s, "cpu_s": cfg.cpu_s, "address_space_mb": cfg.memory_mb,
                   "cgroup_memory_mb": cfg.memory_mb + LAUNCHER_MB if "cgroup" in f else None,
                   "pids_max": cfg.max_processes + LAUNCHER_PROCESSES if "cgroup" in f else None,
                   "nproc": (cfg.max_processes * cfg.workers + LAUNCHER_PROCESSES
                             if "cgroup" not in f and "uid" in f else None),
                   "file_mb": cfg.max_file_mb, "output_chars": cfg.max_output_chars,
                   "capture_bytes": cfg.max_capture_bytes},
        "environment": "empty",
        "interpreter": [sys.executable, "-I", "-S"],
        "site_packages": list(machine.site),
        "kill": "the call's cgroup" if "cgroup" in f else ("process group and pid namespace" if "pid" in f
                                                           else "process group only"),
        "warnings": list(machine.warnings),
        "probe": machine.facts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tools.sandbox PROGRAM.py [options]`: run it, print one JSON line; 0 when it ran ok."""
    parser = argparse.ArgumentParser(prog="python -m tools.sandbox", description=main.__doc__)
    parser.add_argument("program", nargs="?", help="a Python file, or - for stdin")
    parser.add_argument("--report", action="store_true", help="print isolation_report as JSON and exit")
    for field in dataclasses.fields(SandboxConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "command_prefix":
            parser.add_argument(flag, type=shlex.split, default=(), metavar="'CMD ARG...'")
        else:
            parser.add_argument(flag, type=float if field.type in ("float", float) else int, default=field.default)
    args = parser.parse_args(argv)
    cfg = SandboxConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SandboxConfig)})
    if args.report:
        print(json.dumps(isolation_report(cfg)))
        return 0
    if args.program is None:
        parser.error("a PROGRAM (or --report) is needed")
    if args.program == "-":
        code = sys.stdin.read()
    else:
        with open(args.program, encoding="utf-8") as f:
            code = f.read()
    result = run_program(code, cfg)
    print(json.dumps(dataclasses.asdict(result)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
