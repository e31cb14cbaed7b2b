# Sourced by validation/box*.sh on a GPU box: the pinned wheels in .whl/ (bitsandbytes, peft,
# liger-kernel, trl, datasets…) installed into /tmp/site, once per set of wheels (a stamp of their
# listing skips the reinstall on a warm machine), then the repo and /tmp/site on PYTHONPATH and the
# offline, unbuffered environment every harness runs in.
if ls .whl/*.whl >/dev/null 2>&1; then
  STAMP=$(ls -l .whl/*.whl | md5sum | cut -c1-16)
  if [ "$(cat /tmp/site/.canirun-wheels 2>/dev/null)" != "$STAMP" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    echo "$STAMP" > /tmp/site/.canirun-wheels
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

# compact_snapshots DIR LOG: each allocator history DIR/snaps/*.pickle (torch.cuda.memory snapshots)
# compacted to DIR/streams/*.json.gz for the replay checks on the CPU (validation/snapshot.py), then
# the pickles removed; what it prints goes to LOG.
compact_snapshots() {
  if ls "$1"/snaps/*.pickle >/dev/null 2>&1; then
    python3 -m validation.snapshot "$1"/snaps/*.pickle --out-dir "$1"/streams >> "$2" 2>&1
    rm -rf "$1"/snaps
  fi
}
