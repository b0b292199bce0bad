#!/usr/bin/env bash
# Install (if needed), simulate a small multi-site, two-session dataset with ground truth, and run
# scanbridge on it at participant and group level. Outputs land in demo/ (git-ignored); a rerun keeps
# the dataset and resumes from demo/work, so finished participant steps are not redone (rm -rf demo: start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p demo
# the simulator writes into a hidden partial folder and renames it, so demo/bids is complete or absent
[ -d demo/bids ] || scanbridge-simulate demo/bids --subjects 4 --sites 2 --sessions 2 --protocol-change \
    --resolution 2 --seed 1
scanbridge demo/bids demo/out participant -w demo/work "$@"
scanbridge demo/bids demo/out group -w demo/work "$@"
echo "Reports: $(printf '%s ' demo/out/*.html)"
