"""``python -m loft.hpo.worker NAME QUOTA INDEX``: one of ``loft tune --workers N``'s processes.

It runs QUOTA trials of study NAME from the shared journal (the study's settings are in it) and
exits 0, 2 on a loft error (printed as the CLI prints it), 130 when stopped by Ctrl-C."""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name, quota, index = argv[0], int(argv[1]), int(argv[2])
    from loft.core.errors import LoftError, TrainingInterrupted, exit_code_for
    from loft.hpo.study import work

    def say(msg: str) -> None:
        print(f"[worker {index}] {msg}", file=sys.stderr, flush=True)

    try:
        work(name, quota, index, say=say)
    except (KeyboardInterrupt, TrainingInterrupted):
        say("stopped")
        return 130
    except LoftError as e:
        say(f"error: {e.message}" + (f"\n{e.hint}" if e.hint else ""))
        return exit_code_for(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
