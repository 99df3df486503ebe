#!/usr/bin/env bash
# Creates (once) the virtual environment that every README command runs in, and prints its path.
# The venv lives outside the checkout, keyed by the hash of requirements.txt, so a fresh clone on
# a machine that already built it reuses it, and a change of requirements builds a new one.
# Override the location with XFM_VENV=/path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/requirements.txt"
hash="$(sha256sum "$req" | cut -c1-12)"
venv="${XFM_VENV:-$HOME/.cache/xfm_scale/venv-$hash}"
if [ ! -f "$venv/.complete" ]; then
  echo "[bootstrap] creating $venv (first run only: a few minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip wheel setuptools >&2
  # torch first: deepspeed's setup.py imports it, so the rest installs without build isolation.
  "$venv/bin/python" -m pip install -q "$(grep '^torch==' "$req")" "$(grep '^torchvision==' "$req")" >&2
  "$venv/bin/python" -m pip install -q --no-build-isolation -r "$req" >&2
  # The project itself is not installed here: this environment is shared by every checkout with the
  # same requirements.txt, so each checkout puts itself on PYTHONPATH (the Makefile does) and runs
  # its own code. Users who want the console entry points install it into their own environment
  # (pip install -e .).
  # DeepSpeed compiles its CPU ops (shared-memory collectives, the offload optimizer's Adam) on
  # first use, about a minute each on 2 cores: build them now, into torch's extension cache.
  # async_io (NVMe offload, a few minutes) only where libaio is installed (.ci/run installs it).
  DS_ACCELERATOR=cpu "$venv/bin/python" -c 'from deepspeed.accelerator import get_accelerator as a
for op in ("ShareMemCommBuilder", "CPUAdamBuilder"): a().create_op_builder(op).load()
aio = a().create_op_builder("AsyncIOBuilder")
if aio.is_compatible(verbose=False): aio.load()' >&2 \
    || echo "[bootstrap] DeepSpeed's CPU ops did not build now; they compile on first use" >&2
  touch "$venv/.complete"
fi
echo "$venv"
