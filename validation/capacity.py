"""What one process can allocate on this GPU (issue 12's usable capacity), measured in a child process.

    python -m validation.capacity --out capacity.json

The child reads NVML's totals before CUDA starts, then torch's view (`mem_get_info`,
`get_device_properties().total_memory`), then finds, with PyTorch's default caching allocator:
- the largest single tensor it can allocate (bisection to 2 MiB, emptying the cache after each miss);
- the most it can hold in 1 GiB tensors, then topped up with 20 MiB and 2 MiB ones.
Every figure is bytes. The parent never touches CUDA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

GIB = 1024**3
MIB = 1024**2


def _nvml() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"nvml_total_bytes": int(info.total), "nvml_used_bytes": int(info.used), "name": pynvml.nvmlDeviceGetName(handle)}
    except Exception as err:  # noqa: BLE001 - a box without NVML still gives torch's figures
        return {"nvml_error": str(err)}


def probe() -> dict:
    out = {"before_cuda": _nvml(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    out.update(torch=torch.__version__, mem_get_info_free_bytes=int(free), mem_get_info_total_bytes=int(total),
               device_total_memory_bytes=int(torch.cuda.get_device_properties(0).total_memory),
               after_context=_nvml())

    def fits(n: int) -> bool:
        try:
            t = torch.empty(n, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False
        del t
        torch.cuda.empty_cache()
        return True

    lo, hi = 0, int(free) // (2 * MIB) + 1  # in 2 MiB units: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * 2 * MIB) else (lo, mid)
    out["largest_single_tensor_bytes"] = lo * 2 * MIB

    held = []
    for size in (GIB, 20 * MIB, 2 * MIB):
        while True:
            try:
                held.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    out["most_held_bytes"] = sum(t.numel() for t in held)
    out["reserved_when_full_bytes"] = int(torch.cuda.memory_reserved())
    out["at_full"] = _nvml()
    del held
    return out


def _child(conn) -> None:
    try:
        conn.send(probe())
    except BaseException as err:  # noqa: BLE001
        conn.send({"error": f"{type(err).__name__}: {err}"})
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    rows = []
    for conf in (None, "expandable_segments:True"):
        if conf:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
        else:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child,))
        proc.start()
        child.close()
        rows.append(parent.recv() if parent.poll(300) else {"error": "timed out"})
        proc.join(30)
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
