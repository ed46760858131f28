"""The console filter: the tool's lines once, with elapsed/ETA; Ray and library output to the log file."""

from __future__ import annotations

import io

import pytest

from cli.console import ConsoleFilter, ProgressClock


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _filter(tty: bool = False) -> tuple[ConsoleFilter, io.StringIO, io.StringIO, FakeTime]:
    screen, log, now = io.StringIO(), io.StringIO(), FakeTime()
    return ConsoleFilter(screen, log, ProgressClock(now), tty=tty), screen, log, now


def test_worker_lines_routed_and_deduplicated() -> None:
    console, screen, log = _filter()[:3]
    console.write(
        "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m [train] 3.5M parameters, replicate over 2 worker(s)\n"
    )
    console.write(
        "(RayTrainWorker pid=4242) [train] 3.5M parameters, replicate over 2 worker(s)\n"
    )  # re-print
    console.write("(TrainController pid=17) PlacementGroupCleaner: Failed to query Ray Train Controller\n")
    console.write(
        "(ServeReplica:lidit:Ingress pid=88) INFO 2026-12-02 ... POST /v1/images/generations 200 91ms\n"
    )
    console.write("(raylet) [2026-12-02 17:00:00] object store spilled\n")
    console.write(
        "2026/12/02 17:12:25 INFO mlflow.store.db.utils: Creating initial MLflow database tables...\n"
    )
    console.write("Writing model shards: 100%|##########| 1/1 [00:00<00:00, 401.75it/s]\n")
    console.write('{"summary": 1}\n')
    console.write("[quickstart] 3/6 training 4 steps")
    console.write(", 2 workers\n")  # a line in two writes
    shown = screen.getvalue().splitlines()
    assert shown == [
        "[train] 3.5M parameters, replicate over 2 worker(s)",
        '{"summary": 1}',
        "[quickstart] 3/6 training 4 steps, 2 workers",
    ]
    assert len(log.getvalue().splitlines()) == 5 and "PlacementGroupCleaner" in log.getvalue()


def test_counted_progress_gets_elapsed_and_eta() -> None:
    console, screen, _, now = _filter()
    console.write("(RayTrainWorker pid=1) [train] step 10/100 loss 0.5\n")
    now.t += 30.0  # 30 s for 20 steps -> the 70 left take 1:45
    console.write("(RayTrainWorker pid=1) [train] step 30/100 loss 0.4\n")
    first, second = screen.getvalue().splitlines()
    assert first == "[train] step 10/100 loss 0.5  (0:00 elapsed)"
    assert second == "[train] step 30/100 loss 0.4  (0:30 elapsed, ETA 1:45)"


def test_ladder_runs_and_cross_stream_repeats() -> None:
    from collections import deque

    screen, now, recent = io.StringIO(), FakeTime(), deque(maxlen=16)
    clock = ProgressClock(now)
    out = ConsoleFilter(screen, io.StringIO(), clock, tty=False, recent=recent)
    err = ConsoleFilter(screen, io.StringIO(), clock, tty=False, recent=recent)
    err.write("[experiment] [1/4] raw seed 0: training 400 steps\n")
    now.t += 60.0
    err.write("[experiment] [2/4] raw seed 1: training 400 steps\n")
    out.write("(RayTrainWorker pid=9) [train] step 5/5 loss 1.0\n")
    err.write("(RayTrainWorker pid=9) [train] step 5/5 loss 1.0\n")  # Ray Train forwards it on both streams
    out.write("INFO 2026-12-02 17:50:35,296 serve 20361 -- Started Serve in namespace 'serve'.\n")
    lines = screen.getvalue().splitlines()
    assert lines[1].endswith("(1:00 elapsed, ETA 2:00)") and len(lines) == 3


def test_terminal_gets_one_redrawn_bar_line() -> None:
    console, screen, _, now = _filter(tty=True)
    console.write("[cache] shard 1/2: 100 rows\n")
    now.t += 5.0
    console.write("[cache] shard 2/2: 100 rows\n")
    console.write("cache done\n")
    out = screen.getvalue()
    assert out.count("\r\x1b[2K") == 2 and "[##########..........]" in out and "[####################]" in out
    assert out.endswith("]\ncache done\n")  # the finished bar ends its line once


def test_verbose_shows_everything() -> None:
    screen = io.StringIO()
    console = ConsoleFilter(screen, None, ProgressClock(FakeTime()), tty=False)
    console.write("(TrainController pid=17) PlacementGroupCleaner: noise\n")
    assert "PlacementGroupCleaner" in screen.getvalue()


def test_tool_lines_reaching_stdout_are_shown_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--json` keeps stdout to the summary: Ray forwards a worker's progress to our stdout (and, for Ray
    Train, often to stderr too); the line is shown once, on stderr, whichever stream it reaches first."""
    import sys

    from cli.console import tool_console

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with tool_console(None):
        print("(RayTrainWorker pid=7) [train] step 100/200 loss 0.3")
        print("(RayTrainWorker pid=7) [train] step 100/200 loss 0.3", file=sys.stderr)
        print("(RayTrainWorker pid=7) [train] step 200/200 loss 0.2", file=sys.stderr)
        print("(RayTrainWorker pid=7) [train] step 200/200 loss 0.2")
        print('{"summary": 1}')
    assert out.getvalue() == '{"summary": 1}\n'
    shown = err.getvalue().splitlines()
    assert [line.split("  (")[0] for line in shown] == [
        "[train] step 100/200 loss 0.3",
        "[train] step 200/200 loss 0.2",
    ]
