#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter, or fails with a message.
# Order: $PYTHON, python3.12 on PATH (a pyenv shim counts only if it runs),
# then any 3.12 that pyenv has installed.
set -u
works() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; }
for cand in "${PYTHON:-}" "$(command -v python3.12 2>/dev/null)"; do
  [ -n "$cand" ] && works "$cand" && { echo "$cand"; exit 0; }
done
if command -v pyenv >/dev/null 2>&1 || [ -d "${PYENV_ROOT:-$HOME/.pyenv}" ]; then
  root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for dir in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -V -r); do
    works "$dir/bin/python3.12" && { echo "$dir/bin/python3.12"; exit 0; }
  done
fi
echo "error: no Python 3.12 found (tried \$PYTHON, python3.12 on PATH, pyenv versions 3.12*)." >&2
echo "Install one, e.g. 'pyenv install 3.12', or set PYTHON=/path/to/python3.12." >&2
exit 1
