"""Run a module with some directories unreadable to this process only (not to its children, not to Ray workers).

    python -m tests.infra.forbid_paths DIR[:DIR...] -- MODULE [ARGS...]

What the head node of a cluster without the model volume looks like to a job driver: any open, listing or
stat of a path under DIR raises PermissionError here, while the worker processes Ray starts read it normally.
Checks itself before running MODULE (exit 3 if a forbidden path can still be read).
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> int:
    split = sys.argv.index("--")
    roots = [os.path.abspath(p) for p in sys.argv[1].split(os.pathsep) if p]
    roots += [os.path.realpath(p) for p in roots]  # symlinked or not
    module, args = sys.argv[split + 1], sys.argv[split + 2 :]

    def blocked(path: object) -> bool:
        if isinstance(path, int):
            return False
        try:
            p = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
        except TypeError:
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def hook(event: str, hook_args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and hook_args and blocked(hook_args[0]):
            raise PermissionError(f"forbid_paths: this process may not read {hook_args[0]}")

    real_stat = os.stat

    def stat(path, *a, **k):  # isdir/exists/Path.stat all come here; not an audit event
        if blocked(path):
            raise PermissionError(f"forbid_paths: this process may not stat {path}")
        return real_stat(path, *a, **k)

    sys.addaudithook(hook)
    os.stat = stat
    for root in roots:
        if os.path.isdir(root) or os.path.exists(root):
            print(f"forbid_paths: self-check failed, {root} is still visible", file=sys.stderr)
            return 3
        try:
            os.listdir(root)
        except PermissionError:
            pass
        else:
            return 3
    print(f"forbid_paths: {len(set(roots))} paths unreadable to this process", flush=True)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
