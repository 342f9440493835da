"""The parameter reference in docs/ is generated from the config dataclasses and must stay current."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_parameter_tables_are_current() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "param_tables.py")], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (REPO / "docs" / "parameters.md").read_text(), \
        "docs/parameters.md is stale: run `python scripts/param_tables.py > docs/parameters.md`"
    for name in ("pruning.keep_ratio", "rtc.max_guidance_weight", "merge_strategy", "watchdog_timeout"):
        assert f"`{name}`" in out.stdout
