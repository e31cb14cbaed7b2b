#!/usr/bin/env bash
# Run `python -m validation.measure` on a GPU box with the pinned wheels carried in .whl/
# (bitsandbytes and peft; see validation/README.md). Arguments go to validation.measure.
set -u
source "$(dirname "$0")/box_env.sh"
exec python3 -m validation.measure "$@"
