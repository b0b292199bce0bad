#!/usr/bin/env bash
# Install from scratch (if needed) and run the default test suite in two pytest workers
# (SCANBRIDGE_TEST_WORKERS; 0 runs it in one process). Each test file stays on one worker
# (--dist loadfile), so a module's end-to-end fixture (a whole participant run) is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${SCANBRIDGE_TEST_WORKERS:-2}" --dist loadfile "$@"
