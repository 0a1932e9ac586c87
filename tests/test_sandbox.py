"""The sandbox for model-written programs (tools/sandbox.py): each class of attack fails fast, is
reported (ok False, an error class), and leaves nothing running and nothing written outside its
directory; plus the ToRA output conventions, run_programs and the command line.

Attacks on processes also run with part of the isolation turned off (`MODES`), as on a machine that
lacks it: the cgroup alone, or the namespaces alone, must still contain them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tools import sandbox
from tools.sandbox import (TRUNCATION_MARKER, ExecResult, SandboxConfig, isolation_report, main, run_program,
                           run_programs)

CFG = SandboxConfig(timeout_s=1.0, memory_mb=256)  # for programs that run into the clock
ROOMY = dataclasses.replace(CFG, timeout_s=10.0)  # for programs that end by themselves, on a busy machine too
GRACE = 2.0  # a call returns within its limit plus this
REPO = Path(__file__).resolve().parent.parent
MODES = ("full", "cgroup_only", "namespaces_only")  # the isolation a call uses; see mode_features


def machine():
    return sandbox._machine(CFG)


def mode_features(mode: str) -> set[str]:
    """full: all this machine allows; cgroup_only: no namespaces (the cgroup must find and kill every
    process; the uid is dropped only if the interpreter is reachable without a mount namespace);
    namespaces_only: no cgroup (the pid namespace and the process group must)."""
    m = machine()
    features = set(m.features)
    if mode == "cgroup_only":
        if "cgroup" not in features:
            pytest.skip("no per-call cgroup on this machine")
        return {"cgroup"} | ({"uid"} if "uid" in features and not m.expose else set())
    if mode == "namespaces_only":
        if "pid" not in features:
            pytest.skip("no pid namespace on this machine")
        return features - {"cgroup"}
    return features


def run_in(mode: str, code: str, needs: set[str] = frozenset(), cfg: SandboxConfig = CFG) -> ExecResult:
    """Run `code` with only `mode`'s isolation; skip where the mode lacks `needs` on this machine."""
    features = mode_features(mode)
    if not needs <= features:
        pytest.skip(f"{mode} has no {sorted(needs - features)} on this machine")
    return sandbox._execute(code, cfg, sandbox._machine(cfg), features)[0]


@pytest.fixture
def tag() -> str:
    """A name (at most 15 characters: a process's comm) for the processes of one test."""
    return "sbx" + uuid.uuid4().hex[:10]


def named(tag: str) -> str:
    """Program lines that give the program's process (and every fork of it) the name `tag`."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n"


def processes_with(tag: str) -> list[int]:
    """Live processes whose name or command line holds `tag`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/comm").read_text()
            text += Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in text and state != "Z":
            found.append(int(pid))
    return found


def assert_contained(result: ExecResult, limit: float, tag: str | None = None) -> None:
    assert not result.ok and result.error is not None, result
    assert result.seconds < limit + GRACE, result
    if tag is not None:
        assert processes_with(tag) == [], f"processes of the call are still running: {result}"


# ---------------------------------------------------------------------------------------------------
# ToRA's conventions

def test_normal_program_prints_its_result():
    result = run_program("x = 12\nprint(x + 5)", ROOMY)
    assert result == ExecResult(True, "17\n", None, result.seconds)
    assert result.seconds < GRACE


def test_exception_gives_the_last_line_of_the_traceback():
    result = run_program("def f(a):\n    return a / 0\nprint(f(1))", ROOMY)
    assert (result.ok, result.error, result.output) == (False, "exception", "ZeroDivisionError: division by zero")
    result = run_program("x = = 1", ROOMY)
    assert (result.error, result.output) == ("exception", "SyntaxError: invalid syntax")


def test_long_output_is_cut_with_a_marker_keeping_head_and_tail():
    result = run_program("print('a' * 1000 + 'THE END')", ROOMY)
    assert result.ok and len(result.output) <= CFG.max_output_chars
    assert TRUNCATION_MARKER in result.output
    assert result.output.startswith("aaaa") and result.output.endswith("THE END\n")
    assert run_program("print('b' * 10)", ROOMY).output == "b" * 10 + "\n"


def test_venv_packages_and_stdlib_import():
    pytest.importorskip("sympy")
    result = run_program("import fractions, sympy\nprint(sympy.Integer(2) ** 10, fractions.Fraction(1, 3))",
                         ROOMY)
    assert result == ExecResult(True, "1024 1/3\n", None, result.seconds)


def test_threads_and_atexit_finish_before_the_result():
    code = ("import atexit, threading\natexit.register(lambda: print('atexit'))\nready = threading.Event()\n"
            "threading.Thread(target=lambda: (ready.wait(), print('thread'))).start()\nprint('main')\nready.set()")
    assert run_program(code, ROOMY).output == "main\nthread\natexit\n"


# ---------------------------------------------------------------------------------------------------
# Attacks on processes, in each mode

@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode, tag):
    code = named(tag) + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_in(mode, code)
    assert_contained(result, CFG.timeout_s, tag)
    assert result.error == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_process_ignoring_sigterm(mode, tag):
    code = named(tag) + "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    result = run_in(mode, code)
    assert_contained(result, CFG.timeout_s, tag)
    assert (result.error, result.output) == ("timeout", "TimeoutError: the program ran past 1 s")


@pytest.mark.parametrize("mode", MODES)
def test_child_that_outlives_the_call_dies(mode, tag, tmp_path):
    """A double-forked, setsid'd grandchild of a program that exits at once: killed with the call."""
    spot = tmp_path / "open"
    spot.mkdir()
    spot.chmod(0o777)  # writable by the sandbox's uid too, so only the kill keeps the marker away
    marker = spot / "marker"
    child = f"import time, pathlib; time.sleep(0.4); pathlib.Path({str(marker)!r}).write_text('alive')  # {tag}"
    code = (f"import os, subprocess, sys\nif os.fork() == 0:\n    os.setsid()\n"
            f"    subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n    os._exit(0)\n"
            f"os.wait()\nprint('parent done')\n")
    result = run_in(mode, code, cfg=ROOMY)
    assert result.ok and result.output == "parent done\n", result
    assert processes_with(tag) == []
    time.sleep(0.8)
    assert not marker.exists()


@pytest.mark.parametrize("mode", MODES)
def test_signalling_the_parent_fails(mode):
    me, group = os.getpid(), os.getpgid(0)
    code = (f"import os, signal\nfor pid, sig in [(os.getppid(), signal.SIGKILL), ({me}, signal.SIGTERM), "
            f"({me}, signal.SIGKILL), (-{group}, signal.SIGKILL)]:\n"
            f"    try:\n        os.kill(pid, sig)\n        print('sent')\n"
            f"    except OSError as e:\n        print(type(e).__name__)\n")
    result = run_in(mode, code, needs={"uid"}, cfg=ROOMY)  # as root without a pid namespace it could (documented)
    assert result.ok and result.seconds < GRACE, result
    assert len(result.output.split()) == 4 and "sent" not in result.output.split(), result  # and we are alive


def test_killing_everything_it_may_reaches_only_itself():
    """kill(-1): every process the program may signal; with a pid namespace, only its own."""
    if "pid" not in machine().features:
        pytest.skip("no pid namespace on this machine: kill(-1) would reach the sandbox uid's other processes")
    result = run_program("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('sent')", ROOMY)
    assert result.seconds < GRACE
    assert (result.error, result.output) == ("exception", "ProcessLookupError: [Errno 3] No such process"), result


def test_infinite_loop_times_out(tag):
    result = run_program(named(tag) + "while True:\n    pass\n", CFG)
    assert_contained(result, CFG.timeout_s, tag)
    assert result.error == "timeout"


def test_cpu_limit(tag):
    cfg = dataclasses.replace(CFG, timeout_s=8.0, cpu_s=1)  # a busy machine gives it less than a core
    result = run_program(named(tag) + "while True:\n    pass\n", cfg)
    assert_contained(result, cfg.timeout_s, tag)
    assert (result.error, result.output) == ("timeout", "TimeoutError: the program used more than 1 s of CPU time")


def test_programs_die_with_their_caller(tag, tmp_path):
    """The search process SIGKILLed in the middle of a call: the call's processes die with it."""
    (tmp_path / "program.py").write_text(named(tag) + "import time\ntime.sleep(60)\n")
    caller = tmp_path / "caller.py"  # a file: the caller's command line must not hold the tag
    caller.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      f"from tools.sandbox import SandboxConfig, run_program\n"
                      f"run_program(open({str(tmp_path / 'program.py')!r}).read(), SandboxConfig(timeout_s=60.0))\n")
    proc = subprocess.Popen([sys.executable, str(caller)])
    try:
        deadline = time.monotonic() + 20
        while not processes_with(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(tag), "the program never started"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + GRACE
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(tag) == []
    for base in dict(machine().cgroup_bases).values():  # what the killed caller could not clean up
        for name in os.listdir(base):
            if name.startswith(f"mctsloop-sandbox-{proc.pid}-"):
                os.rmdir(os.path.join(base, name))


# ---------------------------------------------------------------------------------------------------
# Memory, recursion, output, files

def test_memory_exhaustion():
    result = run_program("x = bytearray(10 ** 10)", ROOMY)
    assert_contained(result, 0)
    assert (result.error, result.output) == ("memory", "MemoryError")
    result = run_program("chunks = []\nwhile True:\n    chunks.append(b'x' * 10 ** 8)", ROOMY)
    assert_contained(result, 0)
    assert result.error == "memory"


def test_memory_of_all_processes_is_bounded(tag):
    """Each process stays under its address-space limit; together they pass the call's memory cgroup."""
    if "cgroup" not in machine().features:
        pytest.skip("no per-call memory cgroup on this machine")
    # 130 + 180 MB (+ two interpreters) > 256 + 32 MB: the kernel kills the largest, the program
    code = named(tag) + ("import os, time\nif os.fork() == 0:\n    keep = b'x' * (130 << 20)\n    time.sleep(10)\n"
                         "time.sleep(0.3)\nkeep = b'y' * (180 << 20)\nprint('survived')\n")
    result = run_program(code, ROOMY)
    assert_contained(result, 0, tag)
    assert result.error == "memory", result


def test_deep_recursion():
    result = run_program("def f(n):\n    return f(n + 1)\nf(0)", ROOMY)
    assert_contained(result, 0)
    assert (result.error, result.output) == ("exception", "RecursionError: maximum recursion depth exceeded")
    code = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)"
    result = run_program(code, CFG)  # frames until the address space ends, or a crash
    assert_contained(result, CFG.timeout_s)
    assert result.error in ("memory", "killed", "exception", "timeout"), result


def test_huge_output_is_stopped():
    result = run_program("while True:\n    print('x' * 1000)", ROOMY)
    assert_contained(result, 0)  # stopped at the cap, not at the clock
    assert result.error == "output_limit"


@pytest.mark.parametrize("mode", ["full", "cgroup_only"])
def test_files_outside_its_directory_are_safe(mode, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmp_path.chmod(0o755)
    victim.chmod(0o644)
    host_tmp_name = f"sandbox-escape-{uuid.uuid4().hex}"
    attempts = {
        "delete victim": f"os.remove({str(victim)!r})",
        "overwrite victim": f"open({str(victim)!r}, 'w').write('pwned')",
        "new file by victim": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "write repo": f"open({str(REPO / 'sandbox_was_here')!r}, 'w').write('x')",
        "delete repo file": f"os.remove({str(REPO / 'pyproject.toml')!r})",
        "write own dir": "open('mine.txt', 'w').write('x')",
        "write /tmp": f"open('/tmp/{host_tmp_name}', 'w').write('x')",
    }
    lines = ["import json, os", "done = {}", "print(os.getcwd())"]
    for name, action in attempts.items():
        lines += ["try:", f"    {action}", f"    done[{name!r}] = 'done'",
                  "except OSError as e:", f"    done[{name!r}] = type(e).__name__"]
    lines.append("print(json.dumps(done))")
    result = run_in(mode, "\n".join(lines), needs={"uid"}, cfg=ROOMY)
    assert result.ok, result
    cwd, done = result.output.splitlines()[0], json.loads(result.output.splitlines()[1])
    assert victim.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["victim.txt"]
    assert (REPO / "pyproject.toml").exists() and not (REPO / "sandbox_was_here").exists()
    assert done["write own dir"] == "done"
    assert all(v != "done" for k, v in done.items() if k not in ("write own dir", "write /tmp")), done
    leaked = Path("/tmp", host_tmp_name)
    if "mnt" in mode_features(mode):
        assert done["write /tmp"] == "done" and cwd == "/tmp"  # its own tmpfs, gone with the call
        assert not leaked.exists()
    else:  # without a mount namespace the world-writable /tmp is writable (documented)
        leaked.unlink(missing_ok=True)
        assert not Path(cwd).exists()  # its directory is removed afterwards


def test_world_writable_files_are_safe_with_a_mount_namespace(tmp_path):
    if "mnt" not in machine().features:
        pytest.skip("no mount namespace on this machine: world-writable files are writable (documented)")
    spot = tmp_path / "open"
    spot.mkdir()
    spot.chmod(0o777)
    (spot / "shared.txt").write_text("precious")
    (spot / "shared.txt").chmod(0o666)
    code = (f"import os\nfor action in (lambda: open({str(spot / 'shared.txt')!r}, 'w'), "
            f"lambda: open('/var/tmp/x{uuid.uuid4().hex}', 'w'), lambda: open('/dev/shm/x', 'w').write('ok')):\n"
            f"    try:\n        action()\n        print('done')\n"
            f"    except OSError as e:\n        print(type(e).__name__)\n")
    result = run_program(code, ROOMY)
    assert result.ok, result
    assert result.output.split()[0] != "done" and result.output.split()[1] != "done", result
    assert result.output.split()[2] == "done"  # /dev/shm: its own tmpfs
    assert (spot / "shared.txt").read_text() == "precious"


def test_caller_environment_is_invisible(monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("MCTSLOOP_SANDBOX_SECRET", secret)
    code = (f"import os\nprint(dict(os.environ))\nfor path in ('/proc/{os.getpid()}/environ', '/proc/1/environ',"
            f" '/proc/self/environ'):\n    try:\n        print(open(path, 'rb').read())\n"
            f"    except OSError as e:\n        print(type(e).__name__)\n")
    result = run_program(code, ROOMY)
    assert result.ok and result.output.startswith("{}\n"), result
    assert secret not in result.output


def test_network_is_cut(tag):
    if "net" not in machine().features:
        pytest.skip("no network namespace on this machine: the network is open (see isolation_report)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.0)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5)\nprint('connected')"
        result = run_program(code, ROOMY)
        assert_contained(result, 0)
        assert result.error == "exception" and result.output.startswith("OSError"), result
        with pytest.raises(BlockingIOError):
            server.accept()
        opened = run_program(code, dataclasses.replace(ROOMY, network=True))  # the same program, network allowed
        assert opened.ok and opened.output == "connected\n", opened


# ---------------------------------------------------------------------------------------------------
# run_programs, the command line, the config, degradation

def test_run_programs_keeps_order_runs_in_parallel_and_never_raises():
    sleeper = "import time\nstart = time.time()\ntime.sleep(0.5)\nprint({}, start, time.time())"
    codes = [sleeper.format(i) for i in range(4)] + ["1/0", "while True: pass"]
    results = run_programs(codes, dataclasses.replace(CFG, timeout_s=3.0, workers=2))
    assert [r.output.split()[0] for r in results[:4]] == ["0", "1", "2", "3"]
    assert [r.error for r in results[4:]] == ["exception", "timeout"]
    spans = [tuple(map(float, r.output.split()[1:])) for r in results[:4]]
    at_once = [sum(s <= t < e for s, e in spans) for t, _ in spans]  # programs running as each one starts
    assert max(at_once) == 2, spans  # two at a time, never more
    assert run_programs([], CFG) == []


def test_command_line_prints_one_json_line(tmp_path, capsys):
    program = tmp_path / "p.py"
    program.write_text("print(6 * 7)")
    assert main([str(program), "--timeout-s", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {"ok", "output", "error", "seconds"} <= set(record)
    assert (record["ok"], record["output"], record["error"]) == (True, "42\n", None)
    program.write_text("raise ValueError('no')")
    assert main([str(program), "--timeout-s", "10"]) == 1
    assert json.loads(capsys.readouterr().out)["output"] == "ValueError: no"


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="tool.sandbox.timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="tool.sandbox.memory_mb"):
        SandboxConfig(memory_mb=8)
    with pytest.raises(ValueError, match="tool.sandbox.max_output_chars"):
        SandboxConfig(max_output_chars=10)
    with pytest.raises(ValueError, match="tool.sandbox.uid"):
        SandboxConfig(uid=0)
    with pytest.raises(ValueError, match="tool.sandbox.workers"):
        SandboxConfig(workers=0)
    assert SandboxConfig(command_prefix=["nice"]).command_prefix == ("nice",)


def test_isolation_report_matches_what_a_program_sees():
    report = isolation_report(CFG)
    features = machine().features
    assert set(report) >= {"namespaces", "uid_drop", "cgroup", "filesystem", "limits", "warnings", "probe"}
    probe = report["probe"]
    assert probe["environ"] == []
    if "uid" in features:
        assert report["uid_drop"] == probe["uid"] == CFG.uid
    if "net" in features:
        assert probe["interfaces"] == ["lo"] and probe["loopback"] != "connected"
    if "pid" in features:
        assert probe["pid"] == 2
    if "mnt" in features:
        assert probe["cwd"] == "/tmp" and probe["writable"] == ["/dev/shm"]
    json.dumps(report)


def test_missing_cgroups_degrade_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_machines", {})
    monkeypatch.setattr(sandbox, "_cgroup_bases", lambda: {"pids": "/proc/no-such", "memory": "/proc/no-such"})
    with caplog.at_level(logging.WARNING, logger="tools.sandbox"):
        result = run_program("print(1)", ROOMY)
        report = isolation_report(CFG)
        run_program("print(2)", ROOMY)
    assert result.ok and result.output == "1\n"
    assert report["cgroup"] is None and report["kill"] != "the call's cgroup"
    ours = [r for r in caplog.records if r.name == "tools.sandbox"]
    assert len(ours) == 1 and "cgroup" in ours[0].getMessage()


def test_command_prefix_runs_in_front(monkeypatch):
    monkeypatch.setattr(sandbox, "_machines", {})
    cfg = dataclasses.replace(ROOMY, command_prefix=("/usr/bin/nice", "-n", "7"))
    result = run_program("import os\nprint(os.nice(0))", cfg)
    assert result.ok and result.output == "7\n", result
    report = isolation_report(cfg)
    assert not any(report["namespaces"].values()) and report["command_prefix"] == list(cfg.command_prefix)


def break_launcher(monkeypatch, old: str, new: str) -> None:
    """Make the launcher fail one step (its text `old` becomes `new`) and forget the probed machine."""
    monkeypatch.setattr(sandbox, "_machines", {})
    broken = sandbox._LAUNCHER.replace(old, new)
    assert broken != sandbox._LAUNCHER
    monkeypatch.setattr(sandbox, "_LAUNCHER", broken)


def test_failing_namespace_degrades_with_one_warning(monkeypatch, caplog):
    """A network namespace the kernel refuses (an invalid flag stands in): the probe drops it alone."""
    before = machine().features
    if "net" not in before:
        pytest.skip("no network namespace on this machine")
    break_launcher(monkeypatch, '"net": 0x40000000', '"net": 0x1')
    with caplog.at_level(logging.WARNING, logger="tools.sandbox"):
        result = run_program("print(1)", ROOMY)
    assert result.ok and result.output == "1\n"
    features = sandbox._machine(CFG).features
    assert before - features == {"net"}
    ours = [r for r in caplog.records if r.name == "tools.sandbox"]
    assert len(ours) == 1 and "unshare-net" in ours[0].getMessage()
    assert isolation_report(CFG)["network"] == "the machine's"


def test_failing_mounts_degrade_to_a_work_dir(monkeypatch, caplog):
    """No usable mount namespace: a fresh work dir on the host, removed afterwards; where the interpreter
    is out of the sandbox uid's reach without the mounts, the uid change goes too (one warning)."""
    before = machine()
    if "mnt" not in before.features:
        pytest.skip("no mount namespace on this machine")
    break_launcher(monkeypatch, '"tmpfs", "/tmp", "tmpfs"', '"tmpfs", "/tmp", "no-such-fs"')
    with caplog.at_level(logging.WARNING, logger="tools.sandbox"):
        result = run_program("import os\nopen('mine.txt', 'w').write('x')\nprint(os.getcwd())", ROOMY)
    assert result.ok, result
    assert Path(result.output.strip()).name.startswith("mctsloop-sandbox-") and not Path(result.output.strip()).exists()
    lost = before.features - sandbox._machine(CFG).features
    assert lost == ({"mnt", "proc", "uid"} if before.expose else {"mnt", "proc"})
    ours = [r for r in caplog.records if r.name == "tools.sandbox"]
    assert len(ours) == 1 and "mount-tmp" in ours[0].getMessage()
