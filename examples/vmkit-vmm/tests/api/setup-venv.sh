#!/usr/bin/env bash
# Creates (once) the venv with the pinned Firecracker API client that
# fc_client_test.py imports, and prints the path of its python on stdout.
# Everything else (pip's output) goes to stderr.
#
#   PY=$(examples/vmkit-vmm/tests/api/setup-venv.sh)
#
# Location: ${VMKIT_CACHE_DIR:-$HOME/.cache/vmkit}/api-venv. Idempotent: an
# existing venv whose recorded pins equal the ones below and which imports the
# client is reused as it is. Otherwise it is rebuilt next to the old one and
# swapped in. PYTHON picks the interpreter (default python3; 3.8 or newer).
set -euo pipefail

# firecracker-python pins its own direct dependencies exactly. The rest are the
# versions this was tested with (CPython 3.11.7), pinned so that a new urllib3
# or requests cannot change what goes on the wire.
PINS=(
  firecracker-python==0.0.5
  requests==2.32.3
  requests-unixsocket==0.4.1
  urllib3==2.8.0
  certifi==2026.10.19.post1
  charset-normalizer==3.5.3
  idna==3.21
  docker==7.1.0
  tenacity==9.0.0
  psutil==7.0.0
  pyroute2==0.8.1
  paramiko==3.5.1
  bcrypt==5.0.0
  cryptography==51.0.1
  cffi==2.1.1
  pycparser==3.12
  PyNaCl==1.6.2
  Faker==37.0.2
  tzdata==2026.6
)

cache="${VMKIT_CACHE_DIR:-$HOME/.cache/vmkit}"
venv="$cache/api-venv"
stamp="$venv/.vmkit-pins"
python="${PYTHON:-python3}"
want="$(printf '%s\n' "${PINS[@]}")"

usable() {
  [ -x "$1/bin/python" ] &&
    [ "$(cat "$1/.vmkit-pins" 2>/dev/null)" = "$want" ] &&
    "$1/bin/python" -c 'import firecracker.api, firecracker.exceptions' >/dev/null 2>&1
}

if usable "$venv"; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$cache"
# Two runs at once must not build over each other.
exec 9>"$cache/api-venv.lock"
flock 9
if usable "$venv"; then
  echo "$venv/bin/python"
  exit 0
fi

new="$venv.new.$$"
rm -rf "$new"
trap 'rm -rf "$new"' EXIT
echo "setup-venv: creating $venv with ${PINS[0]}" >&2
"$python" -m venv "$new" >&2
"$new/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >&2
printf '%s\n' "$want" >"$new/.vmkit-pins"
# The venv's scripts hold their own path; the python the test runs is invoked
# by absolute path, and `python -m venv` makes bin/python a symlink, so moving
# the finished venv into place is fine for what we use.
rm -rf "$venv"
mv "$new" "$venv"
trap - EXIT
usable "$venv" || { echo "setup-venv: $venv does not import the client" >&2; exit 1; }
echo "$venv/bin/python"
