"""The fresh process that trains with DPO: `python -m policy.train_main <job.json>`.

Started by `policy.dpo.train_dpo_subprocess`, which writes the job (pairs file, model paths, output
folder, result file, config) and reads the result back; see `policy.dpo.run_job`. Under torchrun
(`train.launcher=torchrun`) one of these runs per rank; ranks other than 0 log warnings and errors only.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m policy.train_main <job.json>", file=sys.stderr)
        return 2
    from harness.console import quiet_console

    quiet_console()  # the terminal as the parent's; every record appended to the parent's log file
    from policy.dpo import is_main_rank, run_job

    if not is_main_rank():  # rank 0 speaks for all; the others only when something is wrong
        logging.getLogger().setLevel(logging.WARNING)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: a failure's traceback goes into its summary
        from torch.distributed.elastic.multiprocessing.errors import record

        record(run_job)(args[0])
    else:
        run_job(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
