"""The math-verify worker process behind `tasks.checker` (run as a script, not imported).

Protocol: after importing math-verify it writes "ready" (or, when the import fails, one line
{"error": "<type>: <message>"} and exits with code 1); then for every request line
{"gold": str, "pred": str} on stdin it writes one line {"ok": bool} (or {"ok": false, "error": name}).
It runs in its own process because some inputs make sympy compute for minutes inside C code that
holds the GIL (e.g. comparing 10^{10^{10}} with 5): a thread cannot be stopped, a process can be
killed. math-verify's own timeouts use signal.alarm, which only works in a main thread, so they are
off (parsing_timeout=None, timeout_seconds=None) and the parent enforces the time limit.
"""

import json
import logging
import os
import sys

MEMORY_LIMIT_BYTES = 2 * 1024**3  # huge powers and factorials fail with MemoryError instead of swapping


def _limit_memory() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(hard, MEMORY_LIMIT_BYTES)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX, or not permitted
        pass


def main() -> None:
    # Replies go to a private copy of stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.disable(logging.CRITICAL)
    sys.setrecursionlimit(10_000)
    _limit_memory()
    try:
        from math_verify import parse, verify
    except Exception as exc:  # noqa: BLE001 - the parent names the worker and this error
        reply.write(json.dumps({"error": f"importing math_verify failed: {type(exc).__name__}: {exc}"}) + "\n")
        reply.flush()
        sys.exit(1)

    reply.write("ready\n")
    reply.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold = parse("\\boxed{" + request["gold"] + "}", parsing_timeout=None)
            pred = parse("\\boxed{" + request["pred"] + "}", parsing_timeout=None)
            answer = {"ok": bool(verify(gold, pred, timeout_seconds=None))}
        except Exception as exc:  # noqa: BLE001 - any failure means "not shown equal"
            # Only the type: formatting a sympy object in a message can itself take forever.
            answer = {"ok": False, "error": type(exc).__name__}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
