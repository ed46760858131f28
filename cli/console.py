"""The console is the tool's own: third-party logs and warnings go to a log file unless `--verbose`.

Set before any heavy import, as environment variables, so processes started later (Ray workers, Serve replicas,
MLflow's own subprocesses) inherit the same policy. Our own `[stage]` lines are plain prints to stderr.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# Quiet defaults for the libraries whose INFO lines and deprecation notices used to fill the console.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables...", run links
    "TRANSFORMERS_VERBOSITY": "error",  # deprecation and "accelerate not found" notices
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars
    "RAY_DEDUP_LOGS": "0",  # each forwarded worker line as is; ConsoleFilter drops the repeats it shows
    "PYTHONWARNINGS": "ignore",  # child processes: their warnings are not the user's to act on
}
ALWAYS_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def log_dir() -> Path:
    """`$LIDIT_HOME/logs` (created), where third-party output goes."""
    from lidit.config import lidit_home  # light: pydantic + yaml

    path = lidit_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


_HANDLER_TAG = "_lidit_console"
# Library loggers that install their own stderr handler at import: re-pointed at the log file when already
# imported (in-process tests, a second command); for later imports the *_LOGGING_LEVEL variables above apply.
LIBRARY_LOGGERS = ("mlflow", "alembic", "ray", "transformers", "diffusers")


def configure(command: str, verbose: bool) -> Path | None:
    """Apply the console policy for one `lidit` invocation; returns the log file (None when verbose)."""
    for key, value in (ALWAYS_ENV if verbose else QUIET_ENV).items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, _HANDLER_TAG, False)]  # idempotent
    if verbose:
        return None
    file = log_dir() / f"{command.replace(' ', '-')}.log"
    handler = logging.FileHandler(file, encoding="utf-8")
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Python warnings (deprecations inside our dependencies) -> the `py.warnings` logger -> the log file only.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = True
    for name in LIBRARY_LOGGERS:
        if name in sys.modules:
            logger = logging.getLogger(name)
            logger.handlers = [handler]
            logger.propagate = False
    return file


# A line Ray's log monitor forwards from a worker: "(RayTrainWorker pid=123, ip=...) text", maybe coloured.
_ANSI = r"(?:\x1b\[[0-9;]*m)?"
RAY_WORKER_LINE = re.compile(
    rf"^{_ANSI}\((?P<who>[^()]*(?:pid=\d+|raylet|autoscaler)[^()]*)\){_ANSI}\s?(?P<msg>.*)$"
)
# Tool lines: "[train] ...", "[cache] ...", "[starter   1.2s] ...", "[quickstart] ...".
TOOL_LINE = re.compile(r"^\[(?P<tag>train|cache|starter|quickstart|experiment|eval|serve|lidit)\b[^\]]*\] ")
# Library log records ("2026-12-02 17:12:25,123 INFO ...", "2026/12/02 17:12:25 INFO mlflow...") and progress
# bars of libraries ("Writing model shards: 100%|####|"): never the user's to read.
FOREIGN_LINE = re.compile(
    r"^\s*(?:\d{4}[-/]\d{2}[-/]\d{2}[ T]\d{2}:\d{2}:\d{2}\S*\s+(?:DEBUG|INFO|WARNING)\b"
    r"|(?:DEBUG|INFO|WARNING) \d{4}-\d{2}-\d{2} "  # Ray Serve's format: "INFO 2026-12-02 17:50:35,296 serve ..."
    r"|.*\d+%\|)"
)
# Counted progress in a tool line: "step 40/1200", "shard 3/12", and the ladder's "[3/16] variant seed 0".
COUNTED = re.compile(r"(?:\b(?P<unit>step|shard|prompt|variant)s? |\] \[)(?P<done>\d+)/(?P<total>\d+)\b")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")


def unconfigure() -> None:
    """Undo `configure`'s logging changes (in-process callers such as tests run several commands)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    logging.captureWarnings(False)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressClock:
    """Elapsed time and ETA of counted stage lines (`step 40/1200`), per tag and unit."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.first: dict[tuple[str, str], tuple[float, int]] = {}

    def annotate(self, tag: str, line: str) -> tuple[str, float | None]:
        """`line` + `(elapsed m:ss, ETA m:ss)` when it counts progress; also the done fraction (or None)."""
        m = COUNTED.search(line)
        if not m:
            return line, None
        done, total = int(m["done"]), int(m["total"])
        key, t = (tag, m["unit"] or "run"), self.now()
        if key not in self.first or done < self.first[key][1]:
            self.first[key] = (t, done)  # the rate counts from the first line seen (workers start first)
        t0, done0 = self.first[key]
        elapsed = t - t0
        eta = ""
        if done > done0 and total > 0:
            eta = f", ETA {_clock((total - done) * elapsed / (done - done0))}"
        return f"{line}  ({_clock(elapsed)} elapsed{eta})", done / total if total else None


class ConsoleFilter(io.TextIOBase):
    """A stdout/stderr wrapper that keeps the console the tool's own.

    - Worker lines forwarded by Ray: the tool's (`[train] ...`) are shown once, without Ray's `(pid=...)`
      prefix; everything else (Ray Train/Serve/Data internals, access logs, library warnings) goes to `log`.
    - Library log records and progress bars printed in this process go to `log` as well.
    - Counted progress lines get elapsed time and an ETA; on a terminal they redraw one line as a bar.
    - With `progress` (another filter), the tool's lines are handed to it: stdout's filter passes them to
      stderr's, so stdout holds only plain output (`--json` summaries) however Ray forwards a worker's line.
    With `log=None` (`--verbose`) nothing is hidden; the tool's lines are still annotated.
    """

    def __init__(
        self,
        stream: TextIO,
        log: TextIO | None,
        clock: ProgressClock,
        tty: bool | None = None,
        recent: deque[str] | None = None,
        progress: ConsoleFilter | None = None,
    ) -> None:
        super().__init__()
        self.stream, self.log, self.clock, self.progress = stream, log, clock, progress
        self.tty = stream.isatty() if tty is None else tty
        self.buffer_text = ""
        # Shared by the stdout and stderr filters: Ray Train forwards a worker's line on both streams.
        self.recent_tool_lines: deque[str] = deque(maxlen=16) if recent is None else recent
        self.bar_open = False
        self.lock = threading.Lock()  # Ray's log monitor thread writes concurrently with the main thread

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_text += text
            *lines, self.buffer_text = self.buffer_text.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.log is not None:
                self.log.flush()
            self.stream.flush()

    def _foreign(self, line: str) -> None:
        if self.log is None:
            self._show(line)
        else:
            self.log.write(line + "\n")

    def _line(self, line: str) -> None:
        text = line.rsplit("\r", 1)[-1]  # a carriage-return redraw: keep what ends on screen
        worker = RAY_WORKER_LINE.match(text)
        body = _REPEATED.sub("", worker["msg"]) if worker else text
        tool = TOOL_LINE.match(body)
        if tool is None:
            if worker or FOREIGN_LINE.match(text):
                self._foreign(line)
            else:
                self._show(line)  # our own plain output (tables, summaries, JSON)
            return
        if self.progress is not None:
            self.progress.write(line + "\n")
            return
        if body in self.recent_tool_lines:
            return  # the same line forwarded twice (Ray Train re-prints its workers' output)
        self.recent_tool_lines.append(body)
        annotated, fraction = self.clock.annotate(tool["tag"], body)
        if self.tty and fraction is not None:
            filled = int(20 * min(max(fraction, 0.0), 1.0))
            self.stream.write(f"\r\x1b[2K{annotated} [{'#' * filled}{'.' * (20 - filled)}]")
            self.bar_open = fraction < 1.0
            if not self.bar_open:
                self.stream.write("\n")
            self.stream.flush()
            return
        self._show(annotated)

    def _show(self, line: str) -> None:
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False
        self.stream.write(line + "\n")
        self.stream.flush()


@contextmanager
def tool_console(log_file: Path | None) -> Iterator[None]:
    """Route this process's stdout/stderr through `ConsoleFilter` for the duration of one command."""
    log = open(log_file, "a", encoding="utf-8") if log_file is not None else None  # noqa: SIM115
    clock, recent = ProgressClock(), deque(maxlen=16)
    saved = sys.stdout, sys.stderr
    # Ray forwards a worker's stdout to ours: its progress lines must not land among `--json` output.
    sys.stderr = ConsoleFilter(saved[1], log, clock, recent=recent)  # type: ignore[assignment]
    sys.stdout = ConsoleFilter(saved[0], log, clock, recent=recent, progress=sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        for wrapper in (sys.stdout, sys.stderr):
            if isinstance(wrapper, ConsoleFilter) and wrapper.buffer_text:
                wrapper.write("\n")  # a last line without newline
            wrapper.flush()
        sys.stdout, sys.stderr = saved
        if log is not None:
            log.close()
