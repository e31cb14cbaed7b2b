"""Rebuild `inventories.json.gz`: every catalog config's inventory, built on the meta device.

    python -m estimator.catalog.prebuild

Catalog models then estimate without importing torch or transformers (the app's first page and
the CLI stay fast). Rerun it after changing the catalog, estimator/inventory.py, or the pinned
transformers; tests/test_inventory.py fails while the store is stale.
"""

from __future__ import annotations

import gzip
import json
import sys

from estimator.catalog import load_catalog
from estimator.inventory import PREBUILT_PATH, build_inventory, config_key, inventory_to_dict


def build_store() -> dict:
    import transformers

    inventories = {}
    for entry in load_catalog():
        config = entry.config()
        inventories[config_key(config)] = inventory_to_dict(build_inventory(config))
    return {"transformers": transformers.__version__, "inventories": inventories}


def main() -> int:
    store = build_store()
    text = json.dumps(store, separators=(",", ":"), sort_keys=True).encode("utf-8")
    with open(PREBUILT_PATH, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write(text)  # mtime=0: the same inventories give the same bytes
    print(f"wrote {len(store['inventories'])} inventories to {PREBUILT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
