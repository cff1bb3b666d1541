#!/usr/bin/env bash
# Fetch, on a machine with internet, the wheel the GPU machine lacks (POT, for Experiment A's OT
# source) into .whl/ (git-ignored), for tools/device_check.sh: carry ".whl" with the device call.
# The GPU image has Python 3.12, numpy and scipy (POT's only requirements) but no POT.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "POT==0.9.7.post1"
ls -la .whl
