"""A case's allocator history as a compact stream, for checking the allocator replay (issue 12).

    python -m validation.snapshot CASE.pickle [...] --out-dir DIR

`python -m validation.measure --snapshot-dir DIR` dumps, per case, the snapshot that
`torch.cuda.memory._record_memory_history` keeps (`torch.cuda.memory._dump_snapshot`). This turns one
into what the replay needs and what is small enough to commit: the ordered requests of the
default stream (`alloc` and `free_completed` with their sizes and addresses), and the allocator's
own segment events, from which the reserved memory at every point follows. Each file is gzipped
JSON: {"case", "events": [[action, address, size], ...], "peak_reserved_bytes", "peak_allocated_bytes"}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import sys
from pathlib import Path

KEPT = ("alloc", "free_completed", "segment_alloc", "segment_free", "segment_map", "segment_unmap", "oom")


def stream(snapshot: dict) -> list[list]:
    """The default device's trace as [action, address, size] in order (frames dropped)."""
    traces = snapshot.get("device_traces") or [[]]
    return [[e["action"], int(e.get("addr", 0)), int(e.get("size", 0))] for e in traces[0] if e.get("action") in KEPT]


def peaks(events: list[list]) -> tuple[int, int]:
    """(peak reserved, peak allocated) over the stream, from the segment and block events."""
    reserved = allocated = peak_reserved = peak_allocated = 0
    for action, _, size in events:
        if action in ("segment_alloc", "segment_map"):
            reserved += size
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size
        elif action == "alloc":
            allocated += size
        elif action == "free_completed":
            allocated -= size
        peak_reserved, peak_allocated = max(peak_reserved, reserved), max(peak_allocated, allocated)
    return peak_reserved, peak_allocated


def replay(events: list[list], *, expandable_segments: bool = False, capacity_bytes: int = 1 << 50):
    """The stream's requests, in order, through `estimator.allocator`: its reserved peak next to the
    real one is the check of the allocator's rules. Frees of blocks allocated before the recording
    began are skipped. Returns the Allocator after the last event."""
    from estimator.allocator import Allocator

    alloc = Allocator(capacity_bytes=capacity_bytes, expandable_segments=expandable_segments)
    live: dict[int, int] = {}
    segment_address = None
    for action, address, size in events:
        if action == "segment_alloc":  # the real segment the next request is served from
            segment_address = address
        elif action == "alloc":
            # equal-size free blocks go lowest address first: a segment the replay creates for this
            # request lies where the real one did, above every creation-ordered one (a segment the
            # real allocator did not need keeps its creation order)
            alloc.next_segment_address = segment_address + (1 << 60) if segment_address is not None else None
            live[address] = alloc.malloc(size)
            alloc.next_segment_address = segment_address = None
        elif action == "free_completed" and address in live:
            alloc.free(live.pop(address))
        elif action in ("segment_free", "segment_unmap"):
            # the real allocator released cached memory (torch.cuda.empty_cache, as
            # prepare_model_for_kbit_training calls it, or the out-of-memory retry): so does the replay
            alloc.empty_cache()
    return alloc


def expandable(events: list[list]) -> bool:
    """Whether a history was recorded under expandable segments (its pages are mapped, not its
    segments allocated)."""
    return any(action == "segment_map" for action, _, _ in events)


LIBRARIES = ("transformers/", "peft/", "bitsandbytes/", "accelerate/", "trl/", "liger_kernel/", "validation/")


def _site(frames: list[dict]) -> str:
    """The innermost frame in a library we model (not torch's own internals), as file:line function."""
    for frame in frames or ():
        name = frame.get("filename", "")
        if any(lib in name for lib in LIBRARIES):
            short = name.split("site-packages/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    first = (frames or [{}])[0]
    return f"{first.get('filename', '?').split('site-packages/')[-1]}:{first.get('line')} {first.get('name')}"


def explain(snapshot: dict, top: int = 25) -> dict:
    """The blocks alive at the moment of peak allocated memory, grouped by the line that allocated
    them (needs a history recorded with frames: `validation.measure --snapshot-frames`). Blocks
    allocated before the recording began (the weights) are not in the history; they are the base."""
    trace = (snapshot.get("device_traces") or [[]])[0]

    def walk(until: int | None):  # the live blocks after event `until`, and where the peak was
        live: dict[int, tuple[int, dict]] = {}
        allocated = peak = peak_at = 0
        for i, event in enumerate(trace if until is None else trace[: until + 1]):
            action, address, size = event.get("action"), int(event.get("addr", 0)), int(event.get("size", 0))
            if action == "alloc":
                live[address] = (size, event)
                allocated += size
                if allocated > peak:
                    peak, peak_at = allocated, i
            elif action == "free_completed" and address in live:
                allocated -= live.pop(address)[0]
        return live, peak, peak_at

    _, peak, peak_at = walk(None)  # two passes, not a copy of the live set at every new peak
    at_peak = {a: (size, _site(event.get("frames"))) for a, (size, event) in walk(peak_at)[0].items()}
    sites: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        entry = sites.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_allocated_above_base_bytes": peak,
            "sites": [{"site": site, "bytes": b, "blocks": n} for site, (b, n) in ranked]}


def sites(snapshot: dict) -> list[str | None]:
    """For each event of `stream(snapshot)`, in the same order, the line that made an allocation
    (`_site`; None for the other events): a history recorded with frames, read request by request."""
    traces = snapshot.get("device_traces") or [[]]
    return [_site(e.get("frames")) if e.get("action") == "alloc" else None
            for e in traces[0] if e.get("action") in KEPT]


def convert(path: Path, out_dir: Path) -> Path:
    """The compact stream of one snapshot, to out_dir/CASE.json.gz; a history recorded with frames
    also gets each allocation's line, in "sites" (same order as "events")."""
    with open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    events = stream(snapshot)
    reserved, allocated = peaks(events)
    out = out_dir / (path.stem + ".json.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"case": path.stem, "events": events, "peak_reserved_bytes": reserved,
            "peak_allocated_bytes": allocated}
    traces = (snapshot.get("device_traces") or [[]])[0]
    if any(e.get("frames") for e in traces):
        data["sites"] = sites(snapshot)
    with gzip.open(out, "wt") as handle:
        json.dump(data, handle)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshots", nargs="+")
    parser.add_argument("--out-dir", help="write each snapshot's compact stream here")
    parser.add_argument("--replay", action="store_true",
                        help="replay compact streams (.json.gz) through estimator.allocator and print both reserved peaks")
    parser.add_argument("--expandable-segments", action="store_true",
                        help="replay under expandable segments (a history recorded under them is replayed so anyway)")
    parser.add_argument("--explain", action="store_true",
                        help="for each snapshot (.pickle, recorded with frames), print what was alive at peak allocated, by the line that allocated it")
    args = parser.parse_args(argv)
    if args.explain:
        for name in args.snapshots:
            with open(name, "rb") as handle:
                report = explain(pickle.load(handle))
            print(f"{Path(name).stem}: peak allocated above the recording's start {report['peak_allocated_above_base_bytes'] / 2**20:,.1f} MiB")
            for site in report["sites"]:
                print(f"  {site['bytes'] / 2**20:>10,.1f} MiB  {site['blocks']:>5} blocks  {site['site']}")
        return 0
    if args.replay:
        for name in args.snapshots:
            with gzip.open(name, "rt") as handle:
                data = json.load(handle)
            alloc = replay(data["events"], expandable_segments=args.expandable_segments or expandable(data["events"]))
            real = data["peak_reserved_bytes"]
            print(f"{data['case']}: real reserved peak {real / 2**20:,.0f} MiB (allocated {data['peak_allocated_bytes'] / 2**20:,.0f}), "
                  f"replayed {alloc.peak_reserved_bytes / 2**20:,.0f} MiB ({alloc.peak_reserved_bytes / real - 1:+.1%})")
        return 0
    if not args.out_dir:
        parser.error("--out-dir is required to convert snapshots")
    for name in args.snapshots:
        print(convert(Path(name), Path(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
