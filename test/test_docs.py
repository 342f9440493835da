"""The README's parameter reference is generated from the config dataclasses and must stay current."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_parameter_tables_are_current() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "param_tables.py")], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("<!-- parameters:begin -->") + len("<!-- parameters:begin -->"):
                   readme.index("<!-- parameters:end -->")]
    assert block.strip() == out.stdout.strip(), \
        "README parameter tables are stale: run `python scripts/param_tables.py --readme`"
    for name in ("pruning.keep_ratio", "rtc.max_guidance_weight", "merge_strategy", "watchdog_timeout"):
        assert f"`{name}`" in out.stdout
