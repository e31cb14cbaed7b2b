"""Tests for gpu_db: every entry validated, lookups, the platform rule table, bad YAML.

No network, no GPU: everything reads the YAML files in gpu_db/ or files written to tmp_path.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gpu_db
from gpu_db import GPU, GPUSpecError, MemorySource, Platform, Segment, UnknownGPUError, Vendor

MIB = 1024**2
GIB = 1024**3
ALL_GPUS = gpu_db.load_gpus()


# --------------------------------------------------------------------------- the catalog


def test_database_has_at_least_150_gpus():
    assert len(ALL_GPUS) >= 150


def test_load_gpus_is_cached():
    assert gpu_db.load_gpus() is gpu_db.load_gpus()


@pytest.mark.parametrize("gpu", ALL_GPUS, ids=lambda g: g.name)
def test_every_entry_is_sane(gpu: GPU):
    assert gpu.memory_bytes > 0
    assert gpu.memory_bandwidth_gb_s > 0
    assert 2014 <= gpu.release_year <= 2026
    assert re.match(r"^https?://\S+\.\S+", gpu.source), gpu.source
    for tflops in (gpu.bf16_tflops_dense, gpu.fp16_tflops_dense, gpu.fp8_tflops_dense):
        assert tflops is None or tflops > 0
    # A card with fp8 tensor cores has bf16 ones too, and fp8 is at least as fast.
    if gpu.fp8_tflops_dense is not None:
        assert gpu.bf16_tflops_dense is not None and gpu.fp8_tflops_dense >= gpu.bf16_tflops_dense
    if gpu.memory_source is MemorySource.DRIVER:
        assert gpu.memory_source_ref
        assert gpu.memory_bytes % MIB == 0  # nvidia-smi prints whole MiB
    else:
        assert gpu.memory_source_ref is None
    if gpu.vendor is Vendor.NVIDIA:
        assert gpu.platform is Platform.CUDA
        assert re.fullmatch(r"\d{1,2}\.\d", gpu.compute_capability or "")
        # No bf16 tensor cores before Ampere (8.0): the data says so with null.
        assert (gpu.bf16_tflops_dense is None) == (gpu.compute_capability_tuple < (8, 0))
    else:
        assert gpu.compute_capability is None
    if gpu.platform is Platform.ROCM:
        assert gpu.gfx_arch and gpu.gfx_arch.startswith("gfx")
    if gpu.vendor is Vendor.APPLE:
        assert gpu.unified_memory and gpu.segment is Segment.APPLE
        assert gpu.gpu_memory_share_default in (pytest.approx(2 / 3), pytest.approx(3 / 4))
        assert 0 < gpu.usable_by_default_bytes < gpu.memory_bytes
    elif gpu.vendor is Vendor.NVIDIA:
        # the driver keeps a few hundred MiB for itself (two measured cards, interpolated for the rest)
        assert gpu.gpu_memory_share_default is None
        assert 300 * MIB < gpu.memory_bytes - gpu.usable_by_default_bytes < 1024 * MIB
    else:
        assert gpu.gpu_memory_share_default is None
        assert gpu.usable_by_default_bytes == gpu.memory_bytes
    # Every name and alias leads back to this entry.
    for key in (gpu.name, *gpu.aliases, *gpu.default_for):
        assert gpu_db.find_gpu(key) is gpu, key


def test_names_are_unique():
    names = [g.name for g in ALL_GPUS]
    assert len(names) == len(set(names))


# Every GPU the issue asks for, as a query that must resolve to its own entry.
REQUIRED = [
    # NVIDIA datacenter
    "P100", "V100 SXM2 16GB", "V100 SXM2 32GB", "V100 PCIe 16GB", "V100 PCIe 32GB", "T4", "A2",
    "A10", "A10G", "A16", "A30", "A40", "A100 PCIe 40GB", "A100 SXM 40GB", "A100 PCIe 80GB",
    "A100 SXM 80GB", "H100 PCIe", "H100 SXM", "H100 NVL", "H20", "H200 SXM", "H200 NVL", "B200",
    "GB200", "L4", "L40", "L40S",
    # NVIDIA workstation
    "RTX A2000 6GB", "RTX A2000 12GB", "RTX A4000", "RTX A4500", "RTX A5000", "RTX A5500",
    "RTX A6000", "RTX 4000 Ada", "RTX 4500 Ada", "RTX 5000 Ada", "RTX 6000 Ada",
    "RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell Server Edition",
    # NVIDIA consumer
    "GTX 1050", "GTX 1050 Ti", "GTX 1060 3GB", "GTX 1060 6GB", "GTX 1070", "GTX 1070 Ti",
    "GTX 1080", "GTX 1080 Ti", "GTX 1650", "GTX 1650 Super", "GTX 1660", "GTX 1660 Super",
    "GTX 1660 Ti", "RTX 2060", "RTX 2060 12GB", "RTX 2060 Super", "RTX 2070", "RTX 2070 Super",
    "RTX 2080", "RTX 2080 Super", "RTX 2080 Ti", "Titan RTX", "RTX 3050", "RTX 3060 8GB",
    "RTX 3060 12GB", "RTX 3060 Ti", "RTX 3070", "RTX 3070 Ti", "RTX 3080 10GB", "RTX 3080 12GB",
    "RTX 3080 Ti", "RTX 3090", "RTX 3090 Ti", "RTX 4060", "RTX 4060 Ti 8GB", "RTX 4060 Ti 16GB",
    "RTX 4070", "RTX 4070 Super", "RTX 4070 Ti", "RTX 4070 Ti Super", "RTX 4080", "RTX 4080 Super",
    "RTX 4090", "RTX 4090 D", "RTX 5060", "RTX 5060 Ti 8GB", "RTX 5060 Ti 16GB", "RTX 5070",
    "RTX 5070 Ti", "RTX 5080", "RTX 5090",
    # AMD
    "MI100", "MI210", "MI250", "MI250X", "MI300X", "MI300A", "MI325X", "MI355X", "RX 6600",
    "RX 6600 XT", "RX 6650 XT", "RX 6700 XT", "RX 6750 XT", "RX 6800", "RX 6800 XT", "RX 6900 XT",
    "RX 6950 XT", "RX 7600", "RX 7600 XT", "RX 7700 XT", "RX 7800 XT", "RX 7900 GRE", "RX 7900 XT",
    "RX 7900 XTX", "RX 9060 XT 16GB", "RX 9070", "RX 9070 XT", "Radeon Pro W7800", "Radeon Pro W7900",
    # Intel
    "Gaudi 2", "Gaudi 3", "Arc A380", "Arc A580", "Arc A750", "Arc A770 8GB", "Arc A770 16GB",
    "Arc B570", "Arc B580", "Max 1100", "Max 1550",
    # Apple
    "M1 8GB", "M1 16GB", "M1 Pro 16GB", "M1 Pro 32GB", "M1 Max 32GB", "M1 Max 64GB",
    "M1 Ultra 64GB", "M1 Ultra 128GB", "M2 8GB", "M2 16GB", "M2 24GB", "M2 Pro 16GB", "M2 Pro 32GB",
    "M2 Max 32GB", "M2 Max 64GB", "M2 Max 96GB", "M2 Ultra 64GB", "M2 Ultra 128GB", "M2 Ultra 192GB",
    "M3 8GB", "M3 16GB", "M3 24GB", "M3 Pro 18GB", "M3 Pro 36GB", "M3 Max 36GB", "M3 Max 48GB",
    "M3 Max 64GB", "M3 Max 96GB", "M3 Max 128GB", "M4 16GB", "M4 24GB", "M4 32GB", "M4 Pro 24GB",
    "M4 Pro 48GB", "M4 Pro 64GB", "M4 Max 36GB", "M4 Max 48GB", "M4 Max 64GB", "M4 Max 128GB",
]


def test_every_required_gpu_is_present_and_distinct():
    resolved = {query: gpu_db.find_gpu(query).name for query in REQUIRED}
    duplicates = {q: n for q, n in resolved.items() if list(resolved.values()).count(n) > 1}
    assert not duplicates, duplicates


@pytest.mark.parametrize(
    ("query", "mib"),
    [
        ("H100 SXM", 81_559),  # nvidia-smi on this project's H100 and NVIDIA/nccl#1264
        ("H200", 143_771),  # nvidia-smi on this project's H200
        ("A100 80GB", 81_920),
        ("RTX 4090", 24_564),
        ("T4", 15_360),
        ("L4", 23_034),
        ("A10G", 23_028),
        ("H100 NVL", 95_830),
    ],
)
def test_driver_reported_capacity(query: str, mib: int):
    gpu = gpu_db.find_gpu(query)
    assert gpu.memory_source is MemorySource.DRIVER
    assert gpu.memory_bytes == mib * MIB


def test_h100_sxm_capacity_is_what_the_driver_reports_not_80_gib():
    h100 = gpu_db.find_gpu("H100 SXM")
    assert h100.memory_bytes == 85_520_809_984
    assert h100.memory_gib == pytest.approx(79.647, abs=1e-3)


def test_nominal_capacity_is_gib():
    gpu = gpu_db.find_gpu("RTX 3090 Ti")
    assert gpu.memory_source is MemorySource.NOMINAL
    assert gpu.memory_bytes == 24 * GIB


def test_apple_usable_memory_follows_the_default_gpu_share():
    # llama.cpp printed recommendedMaxWorkingSetSize = 21845.34 MB on a 32 GB M2 Max.
    m2_max = gpu_db.find_gpu("M2 Max 32GB")
    assert m2_max.usable_by_default_bytes / MIB == pytest.approx(21_845.33, abs=0.01)
    # ... and 73728.00 MB on a 96 GB one (3/4).
    assert gpu_db.find_gpu("M2 Max 96GB").usable_by_default_bytes == 72 * GIB


def test_gpu_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALL_GPUS[0].memory_bytes = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- find_gpu


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("h100", "H100 SXM 80GB"),  # family name -> its default_for entry
        ("H100 SXM", "H100 SXM 80GB"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM 80GB"),  # what nvidia-smi / torch print
        ("h100-pcie", "H100 PCIe 80GB"),
        ("4090", "GeForce RTX 4090"),
        ("rtx 4090", "GeForce RTX 4090"),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        ("a100 80gb", "A100 SXM 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
        ("mi300x", "Instinct MI300X"),
        ("AMD Instinct MI300X", "Instinct MI300X"),
        ("m3 max 128gb", "Apple M3 Max 128GB (40-core GPU)"),
        ("Apple M2 Ultra 192GB", "Apple M2 Ultra 192GB (76-core GPU)"),
        ("Tesla T4", "T4"),
        ("rtx 3060", "GeForce RTX 3060 12GB"),
        ("RTX_4060_TI", "GeForce RTX 4060 Ti 8GB"),
        ("a6000", "RTX A6000"),
        ("7900xtx", "Radeon RX 7900 XTX"),
        ("gaudi3", "Gaudi 3"),
        ("4090 laptop", "GeForce RTX 4090 Laptop"),
    ],
)
def test_find_gpu_is_fuzzy(query: str, name: str):
    assert gpu_db.find_gpu(query).name == name


def test_unknown_gpu_lists_close_names_on_one_line():
    with pytest.raises(UnknownGPUError) as info:
        gpu_db.find_gpu("RTX 4099")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "unknown GPU 'RTX 4099'" in message
    assert "\n" not in message
    suggestions = message.split("closest names: ")[1].split(" (")[0].split(", ")
    assert 1 <= len(suggestions) <= 5
    assert "GeForce RTX 4090" in suggestions


def test_empty_query_is_unknown():
    with pytest.raises(UnknownGPUError, match="empty GPU name"):
        gpu_db.find_gpu("  ")


def test_ambiguous_family_name_lists_the_variants():
    with pytest.raises(UnknownGPUError, match="ambiguous") as info:
        gpu_db.find_gpu("m3 max")
    assert "Apple M3 Max 36GB (30-core GPU)" in str(info.value)
    assert "Apple M3 Max 128GB (40-core GPU)" in str(info.value)


# --------------------------------------------------------------------------- filter_gpus


def test_filter_gpus():
    amd = gpu_db.filter_gpus(vendor="amd")
    assert amd and all(g.vendor is Vendor.AMD for g in amd)
    big = gpu_db.filter_gpus(min_memory_bytes=150 * GIB)
    assert {g.name for g in big} >= {"Instinct MI300X", "B200 180GB", "Apple M2 Ultra 192GB (76-core GPU)"}
    assert all(g.memory_bytes >= 150 * GIB for g in big)
    laptops = gpu_db.filter_gpus(vendor=Vendor.NVIDIA, segment="laptop")
    assert laptops and all(g.segment is Segment.LAPTOP for g in laptops)
    assert gpu_db.filter_gpus() == ALL_GPUS


def test_filter_gpus_rejects_unknown_vendor():
    with pytest.raises(ValueError, match="unknown vendor 'nvdia'"):
        gpu_db.filter_gpus(vendor="nvdia")


# --------------------------------------------------------------------------- supports()


def test_t4_has_no_bf16_but_has_fp16():
    t4 = gpu_db.find_gpu("T4")
    ok, reason = t4.supports("bf16")
    assert not ok and "compute capability 8.0" in reason and "fp16" in reason
    assert t4.supports("fp16")[0]
    assert t4.supports("bnb_int8")[0]  # Turing is CC 7.5: LLM.int8() works
    assert not t4.supports("flash_attention_2")[0]


def test_pre_turing_has_no_llm_int8_but_has_4bit():
    v100 = gpu_db.find_gpu("V100")
    assert not v100.supports("bnb_int8")[0]
    assert v100.supports("bnb_4bit")[0]
    assert not v100.supports("bf16")[0]


def test_consumer_pascal_fp16_is_slow():
    ok, reason = gpu_db.find_gpu("GTX 1080 Ti").supports("fp16")
    assert ok and "1/64" in reason


def test_ampere_supports_everything():
    a100 = gpu_db.find_gpu("A100")
    for feature in gpu_db.feature_names():
        assert a100.supports(feature)[0], feature
    assert not a100.unsupported_jobs and not a100.caveats


def test_mi300x_and_bitsandbytes():
    # bitsandbytes 0.50.2 ships ROCm kernels for gfx942 (MI300X): int8, 4-bit, 8-bit optimizers.
    mi300x = gpu_db.find_gpu("MI300X")
    for feature in ("bnb_int8", "bnb_4bit", "bnb_optim_8bit", "bnb_paged_optim", "flash_attention_2", "bf16"):
        assert mi300x.supports(feature) == (True, f"no known limitation for {feature} on rocm")
    assert not gpu_db.find_gpu("MI100").supports("flash_attention_2")[0]
    ok, reason = gpu_db.find_gpu("RX 6800").supports("bf16")
    assert ok and "RDNA 2" in reason


def test_m2_max_and_bitsandbytes():
    # bitsandbytes 0.50.2 lists QLoRA 4-bit as supported on mps (macOS 14+), 8-bit optimizers
    # as planned; paged optimizers need the native allocator that mps lacks.
    m2_max = gpu_db.find_gpu("M2 Max 64GB")
    ok, reason = m2_max.supports("bnb_4bit")
    assert ok and "slow" in reason
    assert not m2_max.supports("bnb_optim_8bit")[0]
    assert not m2_max.supports("bnb_paged_optim")[0]
    assert not m2_max.supports("flash_attention_2")[0]
    assert {limit.feature for limit in m2_max.unsupported_jobs} == {
        "bnb_optim_8bit", "bnb_paged_optim", "flash_attention_2"
    }


def test_gaudi_limits():
    gaudi = gpu_db.find_gpu("Gaudi 3")
    assert not gaudi.supports("bnb_optim_8bit")[0]
    assert gaudi.supports("bnb_int8")[0]
    assert gaudi.supports("bnb_4bit")[0] and "partial" in gaudi.supports("bnb_4bit")[1]


def test_supports_rejects_unknown_feature():
    with pytest.raises(ValueError, match="unknown feature 'bnb_3bit'"):
        ALL_GPUS[0].supports("bnb_3bit")


def test_every_limit_cites_a_source():
    for gpu in ALL_GPUS:
        for limit in (*gpu.unsupported_jobs, *gpu.caveats):
            assert limit.source.startswith("https://") and limit.reason


# --------------------------------------------------------------------------- validation errors

VALID = {
    "name": "Test GPU 24GB",
    "aliases": ["Test GPU"],
    "vendor": "nvidia",
    "segment": "consumer",
    "memory_gib": 24,
    "memory_source": "nominal",
    "memory_type": "GDDR6X",
    "memory_bandwidth_gb_s": 1008,
    "bf16_tflops_dense": 165.2,
    "fp16_tflops_dense": 165.2,
    "fp8_tflops_dense": None,
    "release_year": 2022,
    "form_factor": "PCIe",
    "interconnect": None,
    "platform": "cuda",
    "compute_capability": "8.9",
    "source": "https://example.com/spec",
}


def write_entries(tmp_path, *entries, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"gpus": list(entries)}, sort_keys=False))
    return path


def load_error(path) -> str:
    with pytest.raises(GPUSpecError) as info:
        gpu_db.load_gpus([path])
    return str(info.value)


def test_valid_minimal_entry_loads(tmp_path):
    (gpu,) = gpu_db.load_gpus([write_entries(tmp_path, VALID, name="ok.yaml")])
    assert gpu.memory_bytes == 24 * GIB and gpu.supports("bf16")[0]
    assert gpu_db.find_gpu("test gpu", [gpu]) is gpu


def without(key):
    return {k: v for k, v in VALID.items() if k != key}


@pytest.mark.parametrize(
    ("entry", "field", "problem"),
    [
        (without("memory_bandwidth_gb_s"), "memory_bandwidth_gb_s", "missing"),
        (without("fp8_tflops_dense"), "fp8_tflops_dense", "missing"),
        (without("source"), "source", "missing"),
        ({**VALID, "memory_bandwidth_gb_s": "fast"}, "memory_bandwidth_gb_s", "expected a number"),
        ({**VALID, "memory_gib": -24}, "memory_gib", "must be > 0"),
        ({**VALID, "bf16_tflops_dense": -1}, "bf16_tflops_dense", "must be > 0"),
        ({**VALID, "release_year": "2022"}, "release_year", "expected an integer"),
        ({**VALID, "release_year": 1999}, "release_year", "expected a year"),
        ({**VALID, "memry_gib": 24}, "memry_gib", "unknown key (did you mean 'memory_gib'?)"),
        ({**VALID, "vendor": "nvdia"}, "vendor", "not one of"),
        ({**VALID, "platform": "rocm"}, "platform", "not a nvidia platform"),
        ({**VALID, "source": "example.com"}, "source", "expected an http(s) URL"),
        (without("compute_capability"), "compute_capability", "missing"),
        ({**VALID, "compute_capability": 8.9}, "compute_capability", "expected a non-empty string"),
        ({**VALID, "memory_mib": 24564}, "memory_mib", "exactly one of memory_mib and memory_gib"),
        ({**VALID, "memory_source": "driver"}, "memory_mib", "in MiB"),
        (
            {**without("memory_gib"), "memory_mib": 24564, "memory_source": "driver"},
            "memory_source_ref",
            "missing",
        ),
        ({**VALID, "aliases": "Test GPU"}, "aliases", "expected a list"),
        (
            {**VALID, "vendor": "apple", "segment": "apple", "platform": "mps", "compute_capability": None},
            "compute_capability",
            "only NVIDIA",
        ),
        (
            {**without("compute_capability"), "vendor": "apple", "segment": "apple", "platform": "mps",
             "unified_memory": True},
            "gpu_memory_share_default",
            "missing",
        ),
        (
            {**without("compute_capability"), "vendor": "amd", "platform": "rocm"},
            "gfx_arch",
            "missing",
        ),
    ],
)
def test_validation_error_names_file_entry_and_field(tmp_path, entry, field, problem):
    message = load_error(write_entries(tmp_path, entry))
    assert message.startswith("bad.yaml: entry 0")
    assert f"field {field!r}" in message
    assert problem in message
    if "name" in entry:
        assert repr(entry["name"]) in message


def test_duplicate_name_is_an_error(tmp_path):
    message = load_error(write_entries(tmp_path, VALID, {**VALID, "aliases": []}))
    assert "entry 'Test GPU 24GB'" in message and "field 'name'" in message and "duplicate" in message


def test_duplicate_alias_across_entries_is_an_error(tmp_path):
    other = {**VALID, "name": "Other GPU", "aliases": ["test-gpu"]}  # same after normalizing
    message = load_error(write_entries(tmp_path, VALID, other))
    assert "entry 'Other GPU'" in message and "field 'aliases'" in message and "'test-gpu'" in message


def test_alias_clashing_with_the_real_catalog_is_an_error(tmp_path):
    clash = {**VALID, "aliases": ["H100"]}
    path = write_entries(tmp_path, clash)
    with pytest.raises(GPUSpecError, match="duplicate name/alias 'H100'"):
        gpu_db.load_gpus([*(gpu_db.DATA_DIR / f for f in gpu_db.GPU_FILES), path])


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("gpus:\n  - name: [unclosed\n")
    assert load_error(path).startswith("broken.yaml: not valid YAML")


def test_missing_gpus_list_names_the_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("gpu: []\n")
    assert "empty.yaml: expected a mapping with a top-level 'gpus' list" in load_error(path)


def test_platform_rule_errors_name_the_rule(tmp_path):
    rules = yaml.safe_load((gpu_db.DATA_DIR / gpu_db.PLATFORMS_FILE).read_text())
    rules["platforms"]["cuda"]["rules"][0]["when"] = {"compute_capability_under": "8.0"}
    path = tmp_path / "platforms.yaml"
    path.write_text(yaml.safe_dump(rules))
    with pytest.raises(GPUSpecError, match=r"platforms.yaml: platform 'cuda': rule 0: field 'when'"):
        gpu_db.load_gpus([write_entries(tmp_path, VALID, name="ok.yaml")], platforms_path=path)


# --------------------------------------------------------------------------- import weight


def test_import_is_light():
    code = "import sys, gpu_db; gpu_db.load_gpus(); print(sorted({'torch', 'pandas', 'numpy'} & set(sys.modules)))"
    repo_root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert out.stdout.strip() == "[]"


def test_process_totals_are_the_measured_ones_and_the_rule_goes_through_them():
    """Issue 12: what one process can allocate. H100 and H200 measured; other NVIDIA cards derived."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    h100, h200 = gpu_db.find_gpu("H100 SXM 80GB"), gpu_db.find_gpu("H200 SXM 141GB")
    row = json.loads((root / "validation/results/h100-calibration-a.jsonl").read_text().splitlines()[0])
    assert h100.usable_by_default_bytes == row["gpu"]["total_bytes"] == 85_017_493_504
    probe = json.loads((root / "validation/results_h200/h200-capacity.json").read_text())
    assert all(p["mem_get_info_total_bytes"] == h200.usable_by_default_bytes == 150_109_880_320 for p in probe)
    assert all(p["most_held_bytes"] + (p["mem_get_info_total_bytes"] - p["mem_get_info_free_bytes"]) <= h200.usable_by_default_bytes
               for p in probe)
    fixed, per = gpu_db.nvidia_driver_reserve_mib(gpu_db.load_gpus())
    for gpu in (h100, h200):  # the line goes through both measurements
        mib = gpu.memory_bytes / MIB
        assert mib - fixed - per * mib == pytest.approx(gpu.usable_by_default_bytes / MIB, abs=0.5)
    assert not gpu_db.find_gpu("RTX 4090").process_total_measured
