#!/usr/bin/env bash
# effvla_ros development setup: one idempotent command that makes a virtual environment with real
# ROS 2 (PyPI wheels: Kilted on CPython 3.11, or Jazzy on CPython 3.12), builds this package's
# interfaces with that distro's rosidl, installs CPU PyTorch, transformers and the rest, installs
# effvla_ros (editable) and writes an environment file.
#
#   bash scripts/setup.sh                              # or: make setup         -> .venv (Kilted)
#   EFFVLA_ROS_DISTRO=jazzy bash scripts/setup.sh      # or: make setup-jazzy   -> .venv-jazzy
#   source .venv/env.sh                                # then use rclpy, effvla_ros.msg, `effvla ...`
#
# Variables: EFFVLA_ROS_DISTRO (kilted | jazzy, default kilted),
#            EFFVLA_VENV (default <repo>/.venv for Kilted, <repo>/.venv-jazzy for Jazzy),
#            PYTHON (default: python3.11 / python3.12 on PATH, else under pyenv, else python3),
#            EFFVLA_EXTRAS (default "sim,dev": optional dependency groups of setup.py),
#            EFFVLA_TORCH (auto | none; Jazzy only: auto installs torch 2.13.0 if a CPU build for
#            CPython 3.12 can be had, else makes the venv without torch; none: never),
#            EFFVLA_FORCE_SETUP=1 to redo every step.
set -euo pipefail
# Run from a shell that sourced an env.sh, PYTHONPATH names the interfaces' site-packages, whose rosidl
# egg-info pip then takes for an installed effvla_ros: `pip install -e .` "uninstalled" it by deleting the
# generated effvla_ros/msg (measured: the smoke check then failed with No module named 'effvla_ros.msg').
# The venv needs nothing from the caller's Python environment.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISTRO=${EFFVLA_ROS_DISTRO:-kilted}
die() { echo "effvla setup: ERROR: $*" >&2; exit 1; }
case "$DISTRO" in
  # PYWANT: the CPython the distro's PyPI wheels are built for.
  kilted) PYWANT=3.11; DEFAULT_VENV="$ROOT/.venv";        IFACE_BUILD="$ROOT/build/effvla_interfaces" ;;
  jazzy)  PYWANT=3.12; DEFAULT_VENV="$ROOT/.venv-jazzy";  IFACE_BUILD="$ROOT/build/effvla_interfaces-jazzy" ;;
  humble) die "EFFVLA_ROS_DISTRO=humble: ROS 2 Humble has no PyPI wheels. Build in a colcon workspace with Humble from apt (README, 'On a robot'); this repo checks Humble's Python 3.10 with 'make py310'." ;;
  *) die "unknown EFFVLA_ROS_DISTRO='$DISTRO': use kilted (default) or jazzy" ;;
esac
PYTAG="cp${PYWANT/./}"
VENV=${EFFVLA_VENV:-$DEFAULT_VENV}
EXTRAS=${EFFVLA_EXTRAS:-sim,dev}
TORCH_MODE=${EFFVLA_TORCH:-auto}
[[ "$TORCH_MODE" == auto || "$TORCH_MODE" == none ]] || die "EFFVLA_TORCH='$TORCH_MODE': use auto or none"
[[ "$DISTRO" == jazzy || "$TORCH_MODE" == auto ]] || die "EFFVLA_TORCH=none is for Jazzy only: the Kilted venv always has torch"
STAMP="$VENV/.effvla-setup-stamp"
IFACE_PREFIX="$VENV/effvla_interfaces"

say() { echo "effvla setup: $*"; }
trap 'echo "effvla setup: FAILED at line $LINENO (see the output above). Re-run with EFFVLA_FORCE_SETUP=1 after fixing; delete $VENV to start from scratch." >&2' ERR

# Everything that, when changed, requires redoing the setup.
fingerprint() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/CMakeLists.txt" \
      "$ROOT/package.xml" "$ROOT"/msg/*.msg | sha256sum | cut -d' ' -f1
  echo "extras=$EXTRAS distro=$DISTRO torch=$TORCH_MODE"
}

if [[ -z "${EFFVLA_FORCE_SETUP:-}" && -f "$STAMP" && -f "$VENV/env.sh" ]] \
   && [[ "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
  say "up to date ($VENV); source $VENV/env.sh"
  exit 0
fi

# ---------------------------------------------------------------- 1. interpreter and venv
# An interpreter counts only if it runs and is CPython $PYWANT (a pyenv shim for a version that is
# not selected exists on PATH but fails).
pyver() { "$1" -c 'import platform, sys; assert platform.python_implementation() == "CPython"; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
PY=${PYTHON:-}
TRIED=""
if [[ -z "$PY" ]]; then
  PYENV_ROOT_DIR=$( (pyenv root 2>/dev/null) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for cand in "python$PYWANT" $(ls -d "$PYENV_ROOT_DIR"/versions/"$PYWANT".*/bin/python"$PYWANT" 2>/dev/null | sort -rV) python3; do
    TRIED="$TRIED $cand"
    if command -v "$cand" >/dev/null && [[ "$(pyver "$cand")" == "$PYWANT" ]]; then PY=$cand; break; fi
  done
  [[ -n "$PY" ]] || die "no CPython $PYWANT interpreter found (looked for python$PYWANT on PATH, $PYENV_ROOT_DIR/versions/$PYWANT.*/bin/python$PYWANT, python3 on PATH; tried:$TRIED). The ROS 2 ${DISTRO^} wheels on PyPI are built for CPython $PYWANT: install it (pyenv install $PYWANT, or apt-get install python$PYWANT-dev python$PYWANT-venv) or set PYTHON=/path/to/python$PYWANT."
fi
command -v "$PY" >/dev/null || die "PYTHON='$PY' is not an executable. The ROS 2 ${DISTRO^} wheels need CPython $PYWANT: set PYTHON=/path/to/python$PYWANT."
PYVER=$(pyver "$PY") || die "PYTHON='$PY' does not run (a pyenv shim of a version that is not selected?). Set PYTHON=/path/to/python$PYWANT."
[[ "$PYVER" == "$PYWANT" ]] || die "Python $PYVER found at $(command -v "$PY"); the ROS 2 ${DISTRO^} wheels need CPython $PYWANT. Set PYTHON=/path/to/python$PYWANT."
say "ROS 2 ${DISTRO^} on CPython $PYVER ($(command -v "$PY")), venv $VENV"
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
HAVE_TORCH=1
if [[ "$DISTRO" == kilted ]]; then
  echo "torch==2.13.0" > "$CONSTRAINTS"
  say "installing torch 2.13.0 (CPU)"
  "$VPY" -m pip install -q "torch==2.13.0" -c "$CONSTRAINTS" \
    || die "pip could not install torch==2.13.0 (CPU). On this project's machines it lies on local disk; elsewhere install a CPU or Jetson build of torch into $VENV first."
else
  # Only a CPU build (local version +cpu) is accepted: PyPI's Linux torch is the CUDA build (GBs of
  # nvidia-* wheels). The constraint also makes any later requirement of torch fail instead of
  # pulling that build.
  echo "torch==2.13.0+cpu" > "$CONSTRAINTS"
  if TORCH_VER=$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "torch==$TORCH_VER" > "$CONSTRAINTS"  # one installed by hand (a CPU or Jetson build): keep it
    say "torch $TORCH_VER already in $VENV: kept"
  elif [[ "$TORCH_MODE" == auto ]] && "$VPY" -m pip install -q "torch==2.13.0+cpu" -c "$CONSTRAINTS" 2>/dev/null; then
    say "installed torch 2.13.0 (CPU) for CPython $PYWANT"
  else
    HAVE_TORCH=0
    say "NOTE: no torch in this venv ($([[ "$TORCH_MODE" == none ]] && echo 'EFFVLA_TORCH=none' || echo "no CPU build of torch 2.13.0 for CPython $PYWANT can be had here: the local wheels are cp311 only and PyPI's Linux torch is the CUDA build")). The ROS side (rclpy, interfaces, executor, recorder, parameters) works; the policy and token compressor need torch: install a CPU or Jetson build of torch into $VENV and re-run with EFFVLA_FORCE_SETUP=1."
  fi
fi
REQS="$ROOT/requirements.txt"
if [[ "$DISTRO" != kilted ]]; then
  # One list of requirements: requirements.txt names the Kilted wheels; the other distro's are the
  # same packages, with its rclpy pin and the cmake packages its rosidl needs (Jazzy has no
  # ament_cmake_ros_core; its ament_cmake_ros wants gmock/gtest/pytest, and its rosidl_generator_py
  # python_cmake_module).
  REQS="$VENV/effvla-requirements-$DISTRO.txt"
  sed -e "s/^ros-kilted-rclpy==.*/ros-jazzy-rclpy==7.1.6/" \
      -e "/^ros-kilted-ament-cmake-ros-core\b/d" \
      -e "s/^ros-kilted-/ros-$DISTRO-/" "$ROOT/requirements.txt" > "$REQS"
  printf '%s\n' "# Jazzy's cmake packages that rosidl loads and the wheels' metadata misses" \
    ros-jazzy-ament-cmake-ros ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest \
    ros-jazzy-ament-cmake-pytest ros-jazzy-python-cmake-module >> "$REQS"
  ! grep -q '^ros-kilted-' "$REQS" || die "could not map every Kilted requirement to $DISTRO ($REQS)"
  "$VPY" -m pip install -q setuptools wheel -c "$CONSTRAINTS" || die "pip could not install setuptools"
fi
say "installing ROS 2 ${DISTRO^} wheels and Python dependencies ($(basename "$REQS"))"
"$VPY" -m pip install -q -r "$REQS" -c "$CONSTRAINTS" \
  || die "pip could not install $REQS: see pip's message above."

# The wheels' .pth bootstrapper re-executes Python to set LD_LIBRARY_PATH unless we do it ourselves
# (computed after the wheels are installed: their ros_*.libs folders hold vendored libraries).
ROS_LIBS=$(ls -d "$SITE"/ros_*.libs 2>/dev/null | tr '\n' ':' || true)
[[ -n "$ROS_LIBS" ]] || die "no ros_*.libs folders in $SITE: the ROS 2 wheels did not install"
export LD_LIBRARY_PATH="$IFACE_PREFIX/lib:$VENV/lib:${ROS_LIBS}${ORIG_LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1

# ---------------------------------------------------------------- 3. make the wheels' cmake exports resolve
# The ROS wheels' exported cmake targets name the manylinux build root of their CI
# (/opt/python/cp311-cp311/{include/python3.11,lib/python3.11/site-packages}; cp312 for Jazzy). We point them at a
# small tree of symlinks OUTSIDE the source directory (cmake refuses exported include paths inside
# it) that leads to this interpreter's headers and this venv's site-packages. Nothing global changes.
PYINC=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -f "$PYINC/Python.h" ]] || die "Python headers not found at $PYINC: install python$PYWANT-dev (or the matching -dev package)."
PYROOT="${XDG_CACHE_HOME:-$HOME/.cache}/effvla_ros/pyroot-$(echo "$VENV" | sha256sum | cut -c1-12)"
mkdir -p "$PYROOT/include" "$PYROOT/lib/python$PYWANT"
ln -sfn "$PYINC" "$PYROOT/include/python$PYWANT"
ln -sfn "$SITE" "$PYROOT/lib/python$PYWANT/site-packages"
{ grep -rlZ --include='*.cmake' "/opt/python/$PYTAG-$PYTAG" "$VENV/share" "$SITE" 2>/dev/null || true; } \
  | xargs -0 -r sed -i -e "s#/opt/python/$PYTAG-$PYTAG#$PYROOT#g"

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
  -DPython3_NumPy_INCLUDE_DIR="$PYROOT/lib/python$PYWANT/site-packages/numpy/_core/include" > "$IFACE_BUILD/configure.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/configure.log" >&2; die "cmake configure of the interfaces failed (log: $IFACE_BUILD/configure.log)"; }
cmake --build "$IFACE_BUILD" -j "$(nproc)" > "$IFACE_BUILD/build.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/build.log" >&2; die "building the interfaces failed (log: $IFACE_BUILD/build.log)"; }
cmake --install "$IFACE_BUILD" > "$IFACE_BUILD/install.log" 2>&1 \
  || { tail -40 "$IFACE_BUILD/install.log" >&2; die "installing the interfaces failed"; }
IFACE_SITE=$(ls -d "$IFACE_PREFIX"/lib/python3*/site-packages 2>/dev/null | head -1)
[[ -d "$IFACE_SITE/effvla_ros/msg" ]] || die "rosidl did not produce the Python interfaces under $IFACE_PREFIX"

# ---------------------------------------------------------------- 5. the package itself (editable)
say "installing effvla_ros (editable, extras: $EXTRAS$([[ $HAVE_TORCH == 1 ]] || echo ', without torch'))"
if [[ "$HAVE_TORCH" == 1 ]]; then
  "$VPY" -m pip install -q --no-build-isolation -e "$ROOT[${EXTRAS}]" -c "$CONSTRAINTS" \
    || die "pip could not install effvla_ros from $ROOT"
else
  # setup.py's requirements less torch (read from setup.py itself, so the list stays one), then the
  # package without dependencies.
  DEPS_TXT=$(cd "$ROOT" && EXTRAS="$EXTRAS" "$VPY" - <<'PYEOF'
import os, re, setuptools
got = {}
setuptools.setup = lambda **kw: got.update(kw)
exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__"})
reqs = list(got["install_requires"])
for extra in filter(None, os.environ["EXTRAS"].split(",")):
    reqs += got["extras_require"][extra]
print("\n".join(r for r in reqs if re.split(r"[<>=!~\[; ]", r)[0].lower() != "torch"))
PYEOF
  ) || die "could not read the requirements of setup.py"
  mapfile -t DEPS <<< "$DEPS_TXT"
  "$VPY" -m pip install -q "${DEPS[@]}" -c "$CONSTRAINTS" \
    || die "pip could not install effvla_ros's requirements (without torch): see pip's message above (a requirement that needs torch fails on the constraint torch==2.13.0+cpu)"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
    || die "pip could not install effvla_ros from $ROOT"
fi

# ---------------------------------------------------------------- 6. environment file
cat > "$VENV/env.sh" <<EOF
# Generated by scripts/setup.sh: source it to use ROS 2 (${DISTRO^} wheels, CPython $PYWANT) and effvla_ros.
export EFFVLA_ROS_DISTRO=$DISTRO
export EFFVLA_HAVE_TORCH=$HAVE_TORCH
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
import os, rclpy, transformers
from effvla_ros.msg import VisualTokens, ActionChunk, ExecutionFeedback
if os.environ["EFFVLA_HAVE_TORCH"] == "1":
    import torch
    assert torch.__version__.startswith("2.13.0"), torch.__version__
    t = "torch " + torch.__version__
else:
    t = "no torch"
print("effvla setup: ok  rclpy + effvla_ros.msg (" + os.environ["EFFVLA_ROS_DISTRO"] + ") +", t, "+ transformers", transformers.__version__)
' ) || die "smoke check failed: rclpy or the generated interfaces do not import"

fingerprint > "$STAMP"
say "done. Use: source $VENV/env.sh"
