from __future__ import annotations

import json
import subprocess
import sys


def test_model_list_json_reports_paper_sizes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "model", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["preset"]: r for r in json.loads(out.stdout)["presets"]}
    assert set(rows) == {"tiny", "S", "B", "LI-DiT-1B", "LI-DiT-10B"}
    assert 0.9e9 < rows["LI-DiT-1B"]["params_1_llm"] < rows["LI-DiT-1B"]["params_2_llm"] < 1.2e9
    assert 9.5e9 < rows["LI-DiT-10B"]["params_1_llm"] < rows["LI-DiT-10B"]["params_2_llm"] < 11e9
    assert rows["tiny"]["params_1_llm"] < 5e6


def test_help_and_bad_override_exit_codes() -> None:
    ok = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "model" in ok.stdout
