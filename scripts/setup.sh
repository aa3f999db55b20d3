#!/usr/bin/env bash
# Sets up a fresh machine: the system packages the cluster tests use (and a C++ compiler for the CPU kernels), a
# virtual environment in .venv, the CPU build of torch (pinned first, so no other package pulls a multi-GB CUDA
# build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  # openssh-server, rsync: the Ray cluster tests; slurmctld, slurmd, munge, slurm-client: the Slurm grid test
  for pkg in openssh-server openssh-client rsync g++ slurmctld slurmd munge slurm-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
