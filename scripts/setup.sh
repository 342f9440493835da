#!/usr/bin/env bash
# effvla_ros development setup: one idempotent command that makes a virtual environment with real
# ROS 2 Kilted (PyPI wheels), builds this package's interfaces with rosidl, installs CPU PyTorch,
# transformers and the rest, installs effvla_ros (editable) and writes an environment file.
#
#   bash scripts/setup.sh            # or: make setup
#   source .venv/env.sh              # then use rclpy, effvla_ros.msg, `effvla ...`
#
# Variables: EFFVLA_VENV (default <repo>/.venv), PYTHON (default python3.11, else python3),
#            EFFVLA_EXTRAS (default "sim,dev": optional dependency groups of setup.py),
#            EFFVLA_FORCE_SETUP=1 to redo every step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${EFFVLA_VENV:-$ROOT/.venv}
EXTRAS=${EFFVLA_EXTRAS:-sim,dev}
STAMP="$VENV/.effvla-setup-stamp"
IFACE_PREFIX="$VENV/effvla_interfaces"
IFACE_BUILD="$ROOT/build/effvla_interfaces"

die() { echo "effvla setup: ERROR: $*" >&2; exit 1; }
say() { echo "effvla setup: $*"; }
trap 'echo "effvla setup: FAILED at line $LINENO (see the output above). Re-run with EFFVLA_FORCE_SETUP=1 after fixing; delete $VENV to start from scratch." >&2' ERR

# Everything that, when changed, requires redoing the setup.
fingerprint() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/CMakeLists.txt" \
      "$ROOT/package.xml" "$ROOT"/msg/*.msg | sha256sum | cut -d' ' -f1
  echo "extras=$EXTRAS"
}

if [[ -z "${EFFVLA_FORCE_SETUP:-}" && -f "$STAMP" && -f "$VENV/env.sh" ]] \
   && [[ "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
  say "up to date ($VENV); source $VENV/env.sh"
  exit 0
fi

# ---------------------------------------------------------------- 1. interpreter and venv
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
fi
command -v "$PY" >/dev/null || die "no Python interpreter '$PY'. Install Python 3.11 (the ROS 2 Kilted wheels on PyPI are built for CPython 3.11) or set PYTHON=/path/to/python3.11."
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$PYVER" == "3.11" ]] || die "Python $PYVER found at $(command -v "$PY"); the ROS 2 Kilted wheels need CPython 3.11. Set PYTHON=/path/to/python3.11."
command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake) to build the interfaces."
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler: install one (apt-get install g++) to build the interfaces."

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export PIP_DISABLE_PIP_VERSION_CHECK=1
ORIG_LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}

# ---------------------------------------------------------------- 2. Python packages
# torch first, pinned to the CPU build; the constraint keeps any later requirement from pulling a
# CUDA build of torch.
CONSTRAINTS="$VENV/effvla-constraints.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"
say "installing torch 2.13.0 (CPU)"
"$VPY" -m pip install -q "torch==2.13.0" -c "$CONSTRAINTS" \
  || die "pip could not install torch==2.13.0 (CPU). On this project's machines it lies on local disk; elsewhere install a CPU or Jetson build of torch into $VENV first."
say "installing ROS 2 Kilted wheels and Python dependencies (requirements.txt)"
"$VPY" -m pip install -q -r "$ROOT/requirements.txt" -c "$CONSTRAINTS" \
  || die "pip could not install requirements.txt: see pip's message above."

# The wheels' .pth bootstrapper re-executes Python to set LD_LIBRARY_PATH unless we do it ourselves
# (computed after the wheels are installed: their ros_*.libs folders hold vendored libraries).
ROS_LIBS=$(ls -d "$SITE"/ros_*.libs 2>/dev/null | tr '\n' ':' || true)
[[ -n "$ROS_LIBS" ]] || die "no ros_*.libs folders in $SITE: the ROS 2 wheels did not install"
export LD_LIBRARY_PATH="$IFACE_PREFIX/lib:$VENV/lib:${ROS_LIBS}${ORIG_LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1

# ---------------------------------------------------------------- 3. make the wheels' cmake exports resolve
# The ROS wheels' exported cmake targets name the manylinux build root of their CI
# (/opt/python/cp311-cp311/{include/python3.11,lib/python3.11/site-packages}). We point them at a
# small tree of symlinks OUTSIDE the source directory (cmake refuses exported include paths inside
# it) that leads to this interpreter's headers and this venv's site-packages. Nothing global changes.
PYINC=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -f "$PYINC/Python.h" ]] || die "Python headers not found at $PYINC: install python3.11-dev (or the matching -dev package)."
PYROOT="${XDG_CACHE_HOME:-$HOME/.cache}/effvla_ros/pyroot-$(echo "$VENV" | sha256sum | cut -c1-12)"
mkdir -p "$PYROOT/include" "$PYROOT/lib/python3.11"
ln -sfn "$PYINC" "$PYROOT/include/python3.11"
ln -sfn "$SITE" "$PYROOT/lib/python3.11/site-packages"
{ grep -rlZ --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" "$SITE" 2>/dev/null || true; } \
  | xargs -0 -r sed -i -e "s#/opt/python/cp311-cp311#$PYROOT#g"

# ---------------------------------------------------------------- 4. build the interfaces (rosidl)
say "building interfaces (msg/*.msg) with rosidl into $IFACE_PREFIX"
rm -rf "$IFACE_BUILD"
mkdir -p "$IFACE_BUILD"
export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
export PATH="$VENV/bin:$PATH"
cmake -S "$ROOT" -B "$IFACE_BUILD" -DCMAKE_BUILD_TYPE=Release -DEFFVLA_INSTALL_PYTHON=OFF \
  -DBUILD_TESTING=OFF -DCMAKE_INSTALL_PREFIX="$IFACE_PREFIX" -DPython3_EXECUTABLE="$VPY" \
  -DPython3_FIND_STRATEGY=LOCATION \
  -DPython3_NumPy_INCLUDE_DIR="$PYROOT/lib/python3.11/site-packages/numpy/_core/include" > "$IFACE_BUILD/configure.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/configure.log" >&2; die "cmake configure of the interfaces failed (log: $IFACE_BUILD/configure.log)"; }
cmake --build "$IFACE_BUILD" -j "$(nproc)" > "$IFACE_BUILD/build.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/build.log" >&2; die "building the interfaces failed (log: $IFACE_BUILD/build.log)"; }
cmake --install "$IFACE_BUILD" > "$IFACE_BUILD/install.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/install.log" >&2; die "installing the interfaces failed"; }
IFACE_SITE=$(ls -d "$IFACE_PREFIX"/lib/python3*/site-packages 2>/dev/null | head -1)
[[ -d "$IFACE_SITE/effvla_ros/msg" ]] || die "rosidl did not produce the Python interfaces under $IFACE_PREFIX"

# ---------------------------------------------------------------- 5. the package itself (editable)
say "installing effvla_ros (editable, extras: $EXTRAS)"
"$VPY" -m pip install -q --no-build-isolation -e "$ROOT[${EXTRAS}]" -c "$CONSTRAINTS" \
  || die "pip could not install effvla_ros from $ROOT"

# ---------------------------------------------------------------- 6. environment file
cat > "$VENV/env.sh" <<EOF
# Generated by scripts/setup.sh: source it to use ROS 2 (Kilted wheels) and effvla_ros.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\${PATH}"
export AMENT_PREFIX_PATH="$IFACE_PREFIX:$VENV"
export CMAKE_PREFIX_PATH="$IFACE_PREFIX:$VENV"
export LD_LIBRARY_PATH="$IFACE_PREFIX/lib:$VENV/lib:${ROS_LIBS}\${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$IFACE_SITE\${PYTHONPATH:+:\$PYTHONPATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
# DDS stays on this machine (Jazzy/Kilted; on Humble use ROS_LOCALHOST_ONLY=1 instead).
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=\${ROS_DOMAIN_ID:-42}
export MUJOCO_GL=\${MUJOCO_GL:-egl}
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
EOF

# ---------------------------------------------------------------- 7. smoke check
# shellcheck disable=SC1091
( source "$VENV/env.sh"; "$VPY" -c '
import rclpy, torch, transformers
from effvla_ros.msg import VisualTokens, ActionChunk, ExecutionFeedback
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("effvla setup: ok  rclpy + effvla_ros.msg + torch", torch.__version__, "+ transformers", transformers.__version__)
' ) || die "smoke check failed: rclpy or the generated interfaces do not import"

fingerprint > "$STAMP"
say "done. Use: source $VENV/env.sh"
