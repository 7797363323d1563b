"""A stand-in for Flower's ``flwr-clientapp`` entry, for ``test_superexec``: records what
the forked child saw (its ``argv``, its parent, which modules it already had)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OUT_VAR = "FEDSHIELD_TEST_SUPEREXEC_OUT"


def record() -> None:
    token = sys.argv[sys.argv.index("--token") + 1]
    out = Path(os.environ[OUT_VAR], f"{token}.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "argv": sys.argv,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "preloaded": "wave" in sys.modules,
    }))
    os.replace(tmp, out)  # the test reads it as soon as it appears
