"""The quickstart's console is the tool's own: a micro run, every console line counted (issue 17)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.console import TOOL_LINE

# What the micro run may still print that is not ours: lines Ray's C++ core writes straight to the process's
# stderr (file descriptor 2, below Python), e.g. "core_worker.cc: Actor ... has constructor arguments in the
# object store". The issue's run printed ~265 such lines.
FOREIGN_BUDGET = 3


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min alone; much longer on a box shared with training jobs
def test_micro_quickstart_console_is_the_tools_own(starter_micro: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "starter").symlink_to(starter_micro.root)  # reused after a fingerprint check, not rebuilt
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LIDIT_"))}
    env.update(LIDIT_HOME=str(home), RAY_ADDRESS="local")  # a private Ray; never another session's
    cmd = [sys.executable, "-m", "cli.main", "quickstart", "--preset", "micro", "--steps", "2"]
    cmd += ["--prompts", "2", "--concurrency", "2", "--sample-steps", "2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1700)
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr.splitlines()
    foreign = [line for line in err if line.strip() and not TOOL_LINE.match(line)]
    assert len(foreign) <= FOREIGN_BUDGET, "not the tool's own:\n" + "\n".join(foreign)
    console = run.stdout + run.stderr
    assert len(re.findall(r"^\[train\] step 2/2 ", console, flags=re.M)) == 1  # printed once
    assert re.search(r"^\[cache\] shard \d+/\d+: .*elapsed", console, flags=re.M)  # stage lines with time
    assert re.search(
        r"^MLflow run: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning$",
        run.stdout,
        flags=re.M,
    )
    log = home / "logs" / "lidit-quickstart.log"
    assert log.is_file() and log.stat().st_size > 0  # the hidden output is kept, not lost
    assert len(err) + len(run.stdout.splitlines()) < 60  # fits on one screen
