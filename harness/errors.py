"""User errors (a wrong path, a typo in a config key, a malformed data file, a missing package) end
the program with one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys

from harness.config import ConfigError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    from policy.backends import BackendError
    from policy.models import ModelError
    from tasks.base import DataError

    return (ConfigError, ModelError, BackendError, DataError)


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
