#!/usr/bin/env bash
# One-shot set-up on a fresh Debian/Ubuntu machine: system packages, the project's virtual environment
# (.venv) and the project in editable mode with its test extras. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

system_packages=(dataset-fashion-mnist openclipart-png gnome-backgrounds chromium redis-server)
missing=()
for pkg in "${system_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
# The pip steps need the package index; skip them when this exact set-up is already done, so a machine that was
# set up once runs `scripts/setup.sh && .venv/bin/vlm-al demo` offline. The stamp is keyed by the Python version,
# pyproject.toml and this script (which pins torch); the import check catches a venv that was damaged since.
stamp=.venv/.vlm-al-setup-stamp
want=$( { .venv/bin/python -c 'import sys; print(sys.version)'; cat pyproject.toml scripts/setup.sh; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/vlm-al ] \
   && .venv/bin/python -c 'import torch, torchvision, timm, label_studio_sdk, flask, pytest, playwright, backend, model, harness' 2>/dev/null; then
  echo "setup: already done (.venv is up to date; 'vlm-al' is .venv/bin/vlm-al)"
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on x86_64 these two releases are the pair whose torchvision imports
# (open_clip and timm need it); a looser range can pull a several-GB CUDA build from PyPI.
if [ "$(uname -m)" = "x86_64" ]; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
else
  .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1
fi
.venv/bin/pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "setup: done (.venv ready; 'vlm-al' is .venv/bin/vlm-al)"
