"""`make lint`'s Python 3.10 check (Humble, JetPack 6): it passes on 3.10 code and fails, naming the file and
the construct, on syntax or stdlib newer than 3.10. Runs the Makefile's own target (py310-check) on a
folder of its own, with this venv."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# Python 3.10 code using what 3.10 has: match, X | Y unions, parenthesized context managers, zip(strict=).
PY310_CODE = """\
from __future__ import annotations

import contextlib


def f(x: int | None, a: list[int], b: list[int]) -> str:
    with (contextlib.suppress(KeyError), contextlib.suppress(ValueError)):
        pairs = list(zip(a, b, strict=True))
    match x:
        case None:
            return "none"
        case _:
            return str(len(pairs) + x)
"""

NEWER = {
    "except_star.py": ("try:\n    pass\nexcept* ValueError:\n    pass\n", "except*"),  # syntax, 3.11
    "toml.py": ("import tomllib\n", "tomllib"),  # stdlib module, 3.11
    "self_type.py": ("from typing import Self\n", "typing.Self"),  # stdlib member, 3.11
    "type_alias.py": ("type Vector = list[float]\n", "type"),  # syntax, 3.12
}


def run_check(folder: Path) -> subprocess.CompletedProcess[str]:
    # VENV: the venv of this interpreter (its env.sh and vermin), whichever distro runs the tests
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "py310-check",
                           f"PY310_PATHS={folder}", f"VENV={sys.prefix}"],
                          capture_output=True, text=True, timeout=120)


def test_py310_code_passes(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text(PY310_CODE)
    compile(PY310_CODE, "ok.py", "exec")  # it is valid Python for this interpreter too
    res = run_check(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "py310: ok" in res.stdout


@pytest.mark.parametrize("name", sorted(NEWER))
def test_newer_than_310_fails_naming_it(tmp_path: Path, name: str) -> None:
    code, construct = NEWER[name]
    (tmp_path / "ok.py").write_text(PY310_CODE)
    (tmp_path / name).write_text(code)
    res = run_check(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "py310: FAILED" in out
    assert name in out and construct in out, out
    assert "ok.py" not in out, out  # only the offending file is listed


def test_repo_is_py310_clean() -> None:
    """The same check over the repository's own paths (what `make lint` runs)."""
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "py310-check", f"VENV={sys.prefix}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
