"""`colcon build` of this package against the pip-installed ROS 2 (as on a robot with apt ROS):
the interfaces are generated, our Python package lands next to them, and the install works."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", "build", "install", "log", ".git", "__pycache__", "*.egg-info",
                                ".pytest_cache", ".mypy_cache", ".ruff_cache")


@pytest.mark.slow
def test_colcon_build_and_import(tmp_path: Path) -> None:
    colcon = shutil.which("colcon")
    if colcon is None:
        pytest.skip("colcon is not installed (pip install colcon-core colcon-ros colcon-cmake)")
    ws = tmp_path / "ws"
    shutil.copytree(REPO, ws / "src" / "effvla_ros", ignore=IGNORE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [colcon, "--log-base", str(ws / "log"), "build", "--base-paths", str(ws / "src"),
         "--build-base", str(ws / "build"), "--install-base", str(ws / "install"),
         "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DPython3_FIND_STRATEGY=LOCATION",
         "-DBUILD_TESTING=OFF"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    prefix = ws / "install" / "effvla_ros"
    site = next(prefix.glob("lib/python3*/site-packages"))
    # the installed package holds both our sources and the generated interfaces
    assert (site / "effvla_ros" / "core" / "params.py").is_file()
    assert (site / "effvla_ros" / "msg" / "__init__.py").is_file()
    assert (prefix / "share" / "effvla_ros" / "launch" / "manipulation.launch.py").is_file()
    assert (prefix / "lib" / "effvla_ros" / "chunk_executor").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "effvla_ros").is_file()
    # import from the install alone (not from the source tree or the dev interfaces)
    run_env = dict(env)
    run_env["PYTHONPATH"] = str(site)
    run_env["AMENT_PREFIX_PATH"] = f"{prefix}:{os.environ.get('VIRTUAL_ENV', sys.prefix)}"
    run_env["LD_LIBRARY_PATH"] = f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    code = ("import effvla_ros, effvla_ros.msg as m; from rclpy.serialization import serialize_message as s; "
            "v = m.VisualTokens(data=bytes(range(10))); assert len(s(v)) > 10; "
            "print(effvla_ros.__file__, m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pkg_file, msg_file = out.stdout.split()
    assert pkg_file.startswith(str(site)) and msg_file.startswith(str(site)), out.stdout
