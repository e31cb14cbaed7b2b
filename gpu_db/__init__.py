"""The GPU database: specs as YAML plus a typed, validating loader.

Data lives next to this file, one YAML file per vendor and segment
(``nvidia_datacenter.yaml`` ... ``apple.yaml``), and ``platforms.yaml`` holds the
rule table from which each GPU's unsupported features are derived (bitsandbytes,
bf16, FlashAttention-2 ...). Each YAML file says at its top what its keys and
units mean.

Units live in the names: ``memory_bytes`` is bytes, ``memory_gib`` is GiB (1024**3
bytes), ``memory_bandwidth_gb_s`` is GB/s (10**9 bytes per second),
``*_tflops_dense`` is 10**12 floating-point operations per second without
structured sparsity.

The capacity that decides whether a job fits is the memory the driver reports
(an H100 80GB reports 81,559 MiB, not 80 GiB); ``GPU.memory_source`` says
whether an entry's figure is that (``driver``) or the marketing size
(``nominal``).

Nothing heavy is imported here (no torch, no pandas): only PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import fnmatch
import functools
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = [
    "DATA_DIR",
    "GPU",
    "GPU_FILES",
    "PLATFORMS_FILE",
    "FeatureLimit",
    "GPUSpecError",
    "MemorySource",
    "Platform",
    "Segment",
    "UnknownGPUError",
    "Vendor",
    "feature_names",
    "filter_gpus",
    "find_gpu",
    "load_gpus",
]

DATA_DIR = Path(__file__).resolve().parent
GPU_FILES: tuple[str, ...] = (
    "nvidia_datacenter.yaml",
    "nvidia_workstation.yaml",
    "nvidia_consumer.yaml",
    "amd.yaml",
    "intel.yaml",
    "apple.yaml",
)
PLATFORMS_FILE = "platforms.yaml"

_MIB = 1024**2
_GIB = 1024**3


class Vendor(str, enum.Enum):
    NVIDIA = "nvidia"
    AMD = "amd"
    INTEL = "intel"
    APPLE = "apple"


class Segment(str, enum.Enum):
    DATACENTER = "datacenter"
    WORKSTATION = "workstation"
    CONSUMER = "consumer"
    LAPTOP = "laptop"
    APPLE = "apple"


class Platform(str, enum.Enum):
    """The software stack a GPU runs PyTorch through."""

    CUDA = "cuda"
    ROCM = "rocm"
    XPU = "xpu"
    GAUDI = "gaudi"
    MPS = "mps"


class MemorySource(str, enum.Enum):
    DRIVER = "driver"  # what nvidia-smi (or the vendor's driver) reports as total
    NOMINAL = "nominal"  # the marketing size, taken as GiB


# Which software stacks each vendor's hardware uses.
_VENDOR_PLATFORMS: dict[Vendor, frozenset[Platform]] = {
    Vendor.NVIDIA: frozenset({Platform.CUDA}),
    Vendor.AMD: frozenset({Platform.ROCM}),
    Vendor.INTEL: frozenset({Platform.XPU, Platform.GAUDI}),
    Vendor.APPLE: frozenset({Platform.MPS}),
}


class GPUSpecError(ValueError):
    """A GPU database file is malformed; the message names the file, the entry and the field."""


class UnknownGPUError(ValueError):
    """``find_gpu`` found no GPU (or several) for the query; the message lists close names."""


@dataclasses.dataclass(frozen=True)
class FeatureLimit:
    """One row of platforms.yaml that applies to a GPU.

    ``status`` is ``"unavailable"`` (the feature does not work on this GPU) or
    ``"partial"`` (it works with the caveat in ``reason``).
    """

    feature: str
    status: str
    reason: str
    source: str


@dataclasses.dataclass(frozen=True)
class GPU:
    """One GPU (or one device as PyTorch sees it: a GCD of an MI250, a GPU of a GB200)."""

    name: str
    aliases: tuple[str, ...]
    default_for: tuple[str, ...]
    vendor: Vendor
    segment: Segment
    memory_bytes: int
    memory_source: MemorySource
    memory_source_ref: str | None
    memory_type: str
    memory_bandwidth_gb_s: float
    bf16_tflops_dense: float | None
    fp16_tflops_dense: float | None
    fp8_tflops_dense: float | None
    release_year: int
    form_factor: str
    interconnect: str | None
    tdp_watts: float | None
    platform: Platform
    compute_capability: str | None
    gfx_arch: str | None
    unified_memory: bool
    gpu_memory_share_default: float | None
    source: str
    source_file: str
    # Derived by the loader from platforms.yaml, never written per entry.
    unsupported_jobs: tuple[FeatureLimit, ...] = ()
    caveats: tuple[FeatureLimit, ...] = ()
    # What one process may use: the driver's total less what it keeps for itself, as PyTorch's
    # `mem_get_info()` total reports it. Measured (`process_total_bytes`) where this project's GPU
    # machines ran `python -m validation.capacity`; for other NVIDIA entries derived by the loader
    # (see `nvidia_driver_reserve_mib`); None elsewhere (the reported total is used).
    process_total_bytes: int | None = None
    process_total_measured: bool = False
    # Plain FP32 (CUDA cores, no TF32): what an fp32 matmul runs at under PyTorch's default
    # (`torch.backends.cuda.matmul.allow_tf32 = False`). Only where the vendor page gives it; the
    # speed estimate (estimator/speed.py) has no fp32 figure elsewhere.
    fp32_tflops: float | None = None

    @property
    def memory_gib(self) -> float:
        """Capacity in GiB (1024**3 bytes)."""
        return self.memory_bytes / _GIB

    @property
    def usable_by_default_bytes(self) -> int:
        """Bytes one process may use without tuning: the capacity every verdict compares with.

        Apple: unified memory times macOS's default GPU share (``recommendedMaxWorkingSetSize``;
        see apple.yaml). NVIDIA: the driver's total less its own reservation
        (``process_total_bytes``). Others: the reported total.
        """
        if self.gpu_memory_share_default is None:
            return self.process_total_bytes if self.process_total_bytes is not None else self.memory_bytes
        share = Fraction(self.gpu_memory_share_default).limit_denominator(10_000)
        return int(self.memory_bytes * share)

    @property
    def compute_capability_tuple(self) -> tuple[int, int] | None:
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    def supports(self, feature: str) -> tuple[bool, str]:
        """Whether ``feature`` works on this GPU, and why (or with which caveat).

        ``feature`` is one of ``feature_names()`` (e.g. "bf16", "bnb_4bit",
        "bnb_int8", "flash_attention_2"). Unknown names raise ``ValueError``.
        """
        known = feature_names()
        if feature not in known:
            raise ValueError(
                f"unknown feature {feature!r}; known features: {', '.join(sorted(known))}"
            )
        for limit in self.unsupported_jobs:
            if limit.feature == feature:
                return False, limit.reason
        for limit in self.caveats:
            if limit.feature == feature:
                return True, limit.reason
        return True, f"no known limitation for {feature} on {self.platform.value}"


# --------------------------------------------------------------------------- validation

_REQUIRED_KEYS = (
    "name",
    "vendor",
    "segment",
    "memory_source",
    "memory_type",
    "memory_bandwidth_gb_s",
    "bf16_tflops_dense",
    "fp16_tflops_dense",
    "fp8_tflops_dense",
    "release_year",
    "form_factor",
    "interconnect",
    "platform",
    "source",
)
_OPTIONAL_KEYS = (
    "aliases",
    "default_for",
    "memory_mib",
    "memory_gib",
    "memory_source_ref",
    "tdp_watts",
    "compute_capability",
    "gfx_arch",
    "unified_memory",
    "gpu_memory_share_default",
    "process_total_bytes",
    "fp32_tflops",
)
_ALLOWED_KEYS = frozenset(_REQUIRED_KEYS + _OPTIONAL_KEYS)
_URL_RE = re.compile(r"^https?://[^\s/]+\.[^\s/]+(/\S*)?$")
_CC_RE = re.compile(r"^\d{1,2}\.\d$")
_GFX_RE = re.compile(r"^gfx[0-9a-f]{3,4}$")
_SHARE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_MIN_YEAR, _MAX_YEAR = 2012, 2030


class _Entry:
    """Typed accessors over one raw YAML mapping, raising GPUSpecError with context."""

    def __init__(self, file: str, index: int, raw: Mapping[str, Any]):
        self.file = file
        self.index = index
        self.raw = raw
        name = raw.get("name")
        self.label = f"entry {index} ({name!r})" if isinstance(name, str) else f"entry {index}"

    def fail(self, field: str, problem: str) -> GPUSpecError:
        return GPUSpecError(f"{self.file}: {self.label}: field {field!r}: {problem}")

    def present(self, key: str) -> bool:
        return key in self.raw

    def string(self, key: str, *, nullable: bool = False) -> str | None:
        if key not in self.raw:
            raise self.fail(key, "missing")
        value = self.raw[key]
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            expected = "a non-empty string or null" if nullable else "a non-empty string"
            raise self.fail(key, f"expected {expected}, got {value!r}")
        return value.strip()

    def number(self, key: str, *, nullable: bool = False, positive: bool = True) -> float | None:
        if key not in self.raw:
            raise self.fail(key, "missing" + (" (write null if there is no figure)" if nullable else ""))
        value = self.raw[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            expected = "a number or null" if nullable else "a number"
            raise self.fail(key, f"expected {expected}, got {value!r}")
        if value < 0 or (positive and value == 0):
            raise self.fail(key, f"must be {'> 0' if positive else '>= 0'}, got {value!r}")
        return float(value)

    def integer(self, key: str) -> int:
        if key not in self.raw:
            raise self.fail(key, "missing")
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        return value

    def choice(self, key: str, enum_type: type[enum.Enum]) -> Any:
        value = self.string(key)
        try:
            return enum_type(value)
        except ValueError:
            options = ", ".join(member.value for member in enum_type)
            raise self.fail(key, f"{value!r} is not one of: {options}") from None

    def string_list(self, key: str) -> tuple[str, ...]:
        if key not in self.raw:
            return ()
        value = self.raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(key, f"expected a list of non-empty strings, got {value!r}")
        return tuple(v.strip() for v in value)

    def url(self, key: str) -> str:
        value = self.string(key)
        assert value is not None
        if not _URL_RE.match(value):
            raise self.fail(key, f"expected an http(s) URL, got {value!r}")
        return value


def _parse_share(entry: _Entry) -> float | None:
    if not entry.present("gpu_memory_share_default"):
        return None
    value = entry.raw["gpu_memory_share_default"]
    if isinstance(value, str):
        match = _SHARE_RE.match(value)
        if not match or int(match.group(2)) == 0:
            raise entry.fail("gpu_memory_share_default", f"expected a number or 'a/b', got {value!r}")
        share = int(match.group(1)) / int(match.group(2))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        share = float(value)
    else:
        raise entry.fail("gpu_memory_share_default", f"expected a number or 'a/b', got {value!r}")
    if not 0 < share <= 1:
        raise entry.fail("gpu_memory_share_default", f"must be in (0, 1], got {value!r}")
    return share


def _parse_gpu(entry: _Entry) -> GPU:
    raw = entry.raw
    for key in raw:
        if key not in _ALLOWED_KEYS:
            close = difflib.get_close_matches(str(key), sorted(_ALLOWED_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise entry.fail(str(key), f"unknown key{hint}")

    name = entry.string("name")
    vendor: Vendor = entry.choice("vendor", Vendor)
    segment: Segment = entry.choice("segment", Segment)
    platform: Platform = entry.choice("platform", Platform)
    if platform not in _VENDOR_PLATFORMS[vendor]:
        allowed = ", ".join(sorted(p.value for p in _VENDOR_PLATFORMS[vendor]))
        raise entry.fail("platform", f"{platform.value!r} is not a {vendor.value} platform ({allowed})")
    if (segment is Segment.APPLE) != (vendor is Vendor.APPLE):
        raise entry.fail("segment", "segment 'apple' goes with vendor 'apple' and only with it")

    # Capacity: exactly one of memory_mib (driver figures, as nvidia-smi prints them)
    # and memory_gib (nominal sizes).
    has_mib, has_gib = entry.present("memory_mib"), entry.present("memory_gib")
    if has_mib == has_gib:
        raise entry.fail("memory_mib", "give exactly one of memory_mib and memory_gib")
    if has_mib:
        memory_bytes = entry.integer("memory_mib") * _MIB
        if memory_bytes <= 0:
            raise entry.fail("memory_mib", f"must be > 0, got {raw['memory_mib']!r}")
    else:
        gib = entry.number("memory_gib")
        assert gib is not None
        memory_bytes = int(Fraction(str(gib)) * _GIB)
    memory_source: MemorySource = entry.choice("memory_source", MemorySource)
    if memory_source is MemorySource.DRIVER:
        if not has_mib:
            raise entry.fail("memory_mib", "a driver-reported capacity is given in MiB, as nvidia-smi prints it")
        # A URL where the figure was seen, or "measured: ..." for our own nvidia-smi runs.
        memory_source_ref: str | None = entry.string("memory_source_ref")
    else:
        if entry.present("memory_source_ref"):
            raise entry.fail("memory_source_ref", "only driver-reported capacities carry a reference")
        memory_source_ref = None

    compute_capability: str | None = None
    if vendor is Vendor.NVIDIA:
        compute_capability = entry.string("compute_capability")
        if not _CC_RE.match(compute_capability or ""):
            raise entry.fail("compute_capability", f"expected 'major.minor' like '9.0', got {compute_capability!r}")
    elif entry.present("compute_capability"):
        raise entry.fail("compute_capability", "only NVIDIA GPUs have a CUDA compute capability")

    gfx_arch: str | None = None
    if platform is Platform.ROCM:
        gfx_arch = entry.string("gfx_arch")
        if not _GFX_RE.match(gfx_arch or ""):
            raise entry.fail("gfx_arch", f"expected an LLVM target like 'gfx942', got {gfx_arch!r}")
    elif entry.present("gfx_arch"):
        raise entry.fail("gfx_arch", "only ROCm GPUs have a gfx architecture")

    unified_memory = False
    if entry.present("unified_memory"):
        unified_memory = raw["unified_memory"]
        if not isinstance(unified_memory, bool):
            raise entry.fail("unified_memory", f"expected true or false, got {unified_memory!r}")
    share = _parse_share(entry)
    if vendor is Vendor.APPLE:
        if not unified_memory:
            raise entry.fail("unified_memory", "Apple GPUs use unified memory: write 'unified_memory: true'")
        if share is None:
            raise entry.fail("gpu_memory_share_default", "missing (Apple GPUs need macOS's default GPU share)")
    elif share is not None:
        raise entry.fail("gpu_memory_share_default", "only Apple entries carry a default GPU share")

    year = entry.integer("release_year")
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        raise entry.fail("release_year", f"expected a year in {_MIN_YEAR}..{_MAX_YEAR}, got {year}")

    tdp = entry.number("tdp_watts", nullable=True) if entry.present("tdp_watts") else None
    bandwidth = entry.number("memory_bandwidth_gb_s")
    assert bandwidth is not None
    return GPU(
        name=name or "",
        aliases=entry.string_list("aliases"),
        default_for=entry.string_list("default_for"),
        vendor=vendor,
        segment=segment,
        memory_bytes=memory_bytes,
        memory_source=memory_source,
        memory_source_ref=memory_source_ref,
        memory_type=entry.string("memory_type") or "",
        memory_bandwidth_gb_s=bandwidth,
        bf16_tflops_dense=entry.number("bf16_tflops_dense", nullable=True),
        fp16_tflops_dense=entry.number("fp16_tflops_dense", nullable=True),
        fp8_tflops_dense=entry.number("fp8_tflops_dense", nullable=True),
        fp32_tflops=entry.number("fp32_tflops", nullable=True) if entry.present("fp32_tflops") else None,
        release_year=year,
        form_factor=entry.string("form_factor") or "",
        interconnect=entry.string("interconnect", nullable=True),
        tdp_watts=tdp,
        platform=platform,
        compute_capability=compute_capability,
        gfx_arch=gfx_arch,
        unified_memory=unified_memory,
        gpu_memory_share_default=share,
        source=entry.url("source"),
        source_file=entry.file,
        process_total_bytes=entry.integer("process_total_bytes") if entry.present("process_total_bytes") else None,
        process_total_measured=entry.present("process_total_bytes"),
    )


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GPUSpecError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when present: 8x faster
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GPUSpecError(f"{path.name}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def _load_file(path: Path) -> list[GPU]:
    document = _read_yaml(path)
    if not isinstance(document, dict) or "gpus" not in document:
        raise GPUSpecError(f"{path.name}: expected a mapping with a top-level 'gpus' list")
    extra = set(document) - {"gpus"}
    if extra:
        raise GPUSpecError(f"{path.name}: unknown top-level key(s): {', '.join(sorted(map(str, extra)))}")
    entries = document["gpus"]
    if not isinstance(entries, list) or not entries:
        raise GPUSpecError(f"{path.name}: 'gpus' must be a non-empty list")
    gpus = []
    for index, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise GPUSpecError(f"{path.name}: entry {index}: expected a mapping, got {raw!r}")
        gpus.append(_parse_gpu(_Entry(path.name, index, raw)))
    return gpus


# --------------------------------------------------------------------------- platform rules

_CONDITIONS = frozenset(
    {
        "compute_capability_below",  # "8.0": applies when the GPU's CC is lower
        "compute_capability_in",  # ["6.1"]: applies when the GPU's CC is one of these
        "gfx_arch_matching",  # ["gfx11*"]: applies when gfx_arch matches a glob
        "gfx_arch_not_matching",  # ["gfx90a", ...]: applies when gfx_arch matches none
    }
)
_STATUSES = frozenset({"unavailable", "partial"})


@dataclasses.dataclass(frozen=True)
class _Rule:
    feature: str
    status: str
    reason: str
    source: str
    when: tuple[tuple[str, Any], ...]

    def applies_to(self, gpu: GPU) -> bool:
        for key, value in self.when:
            if key == "compute_capability_below":
                cc = gpu.compute_capability_tuple
                limit = tuple(int(p) for p in str(value).split("."))
                if cc is None or not cc < limit:
                    return False
            elif key == "compute_capability_in":
                if gpu.compute_capability not in value:
                    return False
            elif key == "gfx_arch_matching":
                if gpu.gfx_arch is None or not any(fnmatch.fnmatchcase(gpu.gfx_arch, p) for p in value):
                    return False
            elif key == "gfx_arch_not_matching":
                if gpu.gfx_arch is None or any(fnmatch.fnmatchcase(gpu.gfx_arch, p) for p in value):
                    return False
        return True


@dataclasses.dataclass(frozen=True)
class _PlatformTable:
    features: Mapping[str, str]
    rules: Mapping[Platform, tuple[_Rule, ...]]


def _load_platforms(path: Path) -> _PlatformTable:
    name = path.name
    document = _read_yaml(path)
    if not isinstance(document, dict) or set(document) != {"features", "platforms"}:
        raise GPUSpecError(f"{name}: expected exactly the top-level keys 'features' and 'platforms'")
    features = document["features"]
    if not isinstance(features, dict) or not features or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in features.items()
    ):
        raise GPUSpecError(f"{name}: 'features' must map each feature name to a description")
    platforms = document["platforms"]
    if not isinstance(platforms, dict):
        raise GPUSpecError(f"{name}: 'platforms' must be a mapping")
    rules: dict[Platform, tuple[_Rule, ...]] = {}
    for key, body in platforms.items():
        try:
            platform = Platform(key)
        except ValueError:
            raise GPUSpecError(
                f"{name}: platform {key!r}: unknown; expected one of {', '.join(p.value for p in Platform)}"
            ) from None
        if not isinstance(body, dict) or set(body) - {"label", "rules"} or "rules" not in body:
            raise GPUSpecError(f"{name}: platform {key!r}: expected keys 'label' and 'rules'")
        parsed = []
        for index, row in enumerate(body["rules"] or []):
            where = f"{name}: platform {key!r}: rule {index}"
            if not isinstance(row, dict):
                raise GPUSpecError(f"{where}: expected a mapping")
            unknown = set(row) - {"feature", "status", "when", "reason", "source"}
            if unknown:
                raise GPUSpecError(f"{where}: field {sorted(unknown)[0]!r}: unknown key")
            for field in ("feature", "status", "reason", "source"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise GPUSpecError(f"{where}: field {field!r}: missing or not a string")
            if row["feature"] not in features:
                raise GPUSpecError(f"{where}: field 'feature': {row['feature']!r} is not listed under 'features'")
            if row["status"] not in _STATUSES:
                raise GPUSpecError(f"{where}: field 'status': expected one of {sorted(_STATUSES)}")
            if not _URL_RE.match(row["source"]):
                raise GPUSpecError(f"{where}: field 'source': expected an http(s) URL")
            when = row.get("when") or {}
            if not isinstance(when, dict):
                raise GPUSpecError(f"{where}: field 'when': expected a mapping")
            for cond, value in when.items():
                if cond not in _CONDITIONS:
                    raise GPUSpecError(f"{where}: field 'when': unknown condition {cond!r}")
                if cond == "compute_capability_below" and not _CC_RE.match(str(value)):
                    raise GPUSpecError(f"{where}: field 'when': {cond} needs 'major.minor'")
                if cond != "compute_capability_below" and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                ):
                    raise GPUSpecError(f"{where}: field 'when': {cond} needs a list of strings")
            parsed.append(
                _Rule(
                    feature=row["feature"],
                    status=row["status"],
                    reason=" ".join(row["reason"].split()),
                    source=row["source"],
                    when=tuple((k, tuple(v) if isinstance(v, list) else str(v)) for k, v in when.items()),
                )
            )
        rules[platform] = tuple(parsed)
    missing = [p.value for p in Platform if p not in rules]
    if missing:
        raise GPUSpecError(f"{name}: no entry for platform(s): {', '.join(missing)}")
    return _PlatformTable(features=dict(features), rules=rules)


def _apply_rules(gpu: GPU, table: _PlatformTable) -> GPU:
    """Attach the first matching rule per feature: unavailable ones and caveats."""
    decided: dict[str, _Rule] = {}
    for rule in table.rules[gpu.platform]:
        if rule.feature not in decided and rule.applies_to(gpu):
            decided[rule.feature] = rule
    unsupported = tuple(
        FeatureLimit(r.feature, r.status, r.reason, r.source) for r in decided.values() if r.status == "unavailable"
    )
    caveats = tuple(
        FeatureLimit(r.feature, r.status, r.reason, r.source) for r in decided.values() if r.status == "partial"
    )
    return dataclasses.replace(gpu, unsupported_jobs=unsupported, caveats=caveats)


@functools.lru_cache(maxsize=None)
def _platform_table(path: str) -> _PlatformTable:
    return _load_platforms(Path(path))


def feature_names() -> frozenset[str]:
    """The feature names ``GPU.supports`` accepts (the keys of platforms.yaml's 'features')."""
    return frozenset(_platform_table(str(DATA_DIR / PLATFORMS_FILE)).features)


# --------------------------------------------------------------------------- loading

def _normalize(text: str) -> str:
    """Lower-case and drop everything but letters and digits: 'RTX-4090 ' -> 'rtx4090'."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


@functools.lru_cache(maxsize=None)
def _load_cached(paths: tuple[str, ...], platforms_path: str) -> tuple[GPU, ...]:
    table = _platform_table(platforms_path)
    gpus: list[GPU] = []
    for path in paths:
        gpus.extend(_load_file(Path(path)))
    # Names, aliases and default_for keys must be unique across the whole database,
    # compared as find_gpu compares them (case, spaces and dashes ignored).
    owner: dict[str, tuple[GPU, str]] = {}
    for gpu in gpus:
        for field, keys in (("name", (gpu.name,)), ("aliases", gpu.aliases), ("default_for", gpu.default_for)):
            for key in keys:
                norm = _normalize(key)
                if not norm:
                    raise GPUSpecError(f"{gpu.source_file}: entry {gpu.name!r}: field {field!r}: {key!r} is empty")
                if norm in owner and owner[norm][0] is not gpu:
                    other, other_field = owner[norm]
                    raise GPUSpecError(
                        f"{gpu.source_file}: entry {gpu.name!r}: field {field!r}: duplicate name/alias {key!r} "
                        f"(already the {other_field} of {other.name!r} in {other.source_file})"
                    )
                owner[norm] = (gpu, field)
    reserve = nvidia_driver_reserve_mib(gpus)
    return tuple(_with_process_total(_apply_rules(gpu, table), reserve) for gpu in gpus)


def nvidia_driver_reserve_mib(gpus: Iterable[GPU]) -> tuple[float, float]:
    """(fixed MiB, MiB per MiB of memory) the NVIDIA driver keeps from a process, fitted through the
    entries whose process total was measured: the driver's total (nvidia-smi) less PyTorch's
    (`mem_get_info`). Two points so far: H100 80GB, 81,559 − 81,079 = 480 MiB; H200, 143,771 −
    143,156 = 615 MiB (validation/results_h200/h200-capacity.json, validation/results/*). A line
    through two points fits them exactly; no other card is measured, so it is an interpolation."""
    points = sorted({(g.memory_bytes / _MIB, (g.memory_bytes - g.process_total_bytes) / _MIB) for g in gpus
                     if g.vendor is Vendor.NVIDIA and g.process_total_measured and g.process_total_bytes is not None})
    if not points:
        return 0.0, 0.0
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def _with_process_total(gpu: GPU, reserve: tuple[float, float]) -> GPU:
    if gpu.vendor is not Vendor.NVIDIA or gpu.process_total_bytes is not None or gpu.unified_memory:
        return gpu
    fixed, per = reserve
    memory_mib = gpu.memory_bytes / _MIB
    return dataclasses.replace(gpu, process_total_bytes=int(round(memory_mib - fixed - per * memory_mib)) * _MIB)


def load_gpus(paths: Iterable[str | Path] | None = None, *, platforms_path: str | Path | None = None) -> tuple[GPU, ...]:
    """Load and validate GPU entries (cached per set of paths).

    ``paths`` defaults to every vendor file in this package; ``platforms_path``
    to this package's platforms.yaml. Raises ``GPUSpecError`` naming the file,
    the entry and the field at the first problem.
    """
    if paths is None:
        resolved = tuple(str(DATA_DIR / name) for name in GPU_FILES)
    else:
        resolved = tuple(str(Path(p).resolve()) for p in paths)
    rules = str(Path(platforms_path).resolve()) if platforms_path is not None else str(DATA_DIR / PLATFORMS_FILE)
    return _load_cached(resolved, rules)


# --------------------------------------------------------------------------- lookup

# Words a user may or may not type in front of a model name: "NVIDIA GeForce RTX 4090",
# "Tesla T4", "AMD Instinct MI300X", "Intel Arc A770", "Apple M3 Max".
_PREFIX_WORDS = (
    "nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel", "habana",
    "datacentergpu", "arc", "apple", "rtx", "gtx", "rx",
)


def _strip_prefixes(norm: str) -> str:
    changed = True
    while changed:
        changed = False
        for word in _PREFIX_WORDS:
            if norm.startswith(word) and len(norm) > len(word):
                norm = norm[len(word):]
                changed = True
    return norm


@dataclasses.dataclass(frozen=True)
class _Index:
    exact: Mapping[str, GPU]  # normalized names, aliases, default_for
    derived: Mapping[str, GPU]  # the same without vendor words or parentheses, where unambiguous
    display: Mapping[str, str]  # every key -> the GPU name to show in suggestions


@functools.lru_cache(maxsize=8)
def _index(gpus: tuple[GPU, ...]) -> _Index:
    exact: dict[str, GPU] = {}
    for gpu in gpus:
        for key in (gpu.name, *gpu.aliases, *gpu.default_for):
            exact[_normalize(key)] = gpu
    derived: dict[str, GPU | None] = {}
    for gpu in gpus:
        for key in (gpu.name, *gpu.aliases, *gpu.default_for):
            without_parens = re.sub(r"\([^)]*\)", "", key)
            for variant in {_strip_prefixes(_normalize(key)), _normalize(without_parens),
                            _strip_prefixes(_normalize(without_parens))}:
                if not variant or variant in exact:
                    continue
                if variant in derived and derived[variant] is not gpu:
                    derived[variant] = None  # two GPUs claim it: ambiguous, drop
                else:
                    derived[variant] = gpu
    clean = {k: g for k, g in derived.items() if g is not None}
    display = {k: g.name for k, g in {**clean, **exact}.items()}
    return _Index(exact=exact, derived=clean, display=display)


def find_gpu(query: str, gpus: Iterable[GPU] | None = None) -> GPU:
    """Find a GPU by name or alias, ignoring case, spaces, dashes and vendor words.

    "h100" -> the H100 SXM 80GB (family names resolve through each entry's
    ``default_for``), "rtx 4090" -> GeForce RTX 4090, "m3 max 128gb" -> the
    Apple M3 Max 128GB. A query that is the start of exactly one GPU's name
    also resolves. Otherwise raises ``UnknownGPUError`` with up to 5 close names.
    """
    pool = tuple(gpus) if gpus is not None else load_gpus()
    index = _index(pool)
    norm = _normalize(str(query) if query is not None else "")
    if not norm:
        raise UnknownGPUError("empty GPU name; give a name like 'H100 SXM', 'RTX 4090' or 'M3 Max 128GB'")
    for candidate in (norm, _strip_prefixes(norm)):
        if candidate in index.exact:
            return index.exact[candidate]
        if candidate in index.derived:
            return index.derived[candidate]
    stripped = _strip_prefixes(norm)
    if len(stripped) >= 2:
        matches = {g.name: g for k, g in {**index.derived, **index.exact}.items() if k.startswith(stripped)}
        if len(matches) == 1:
            return next(iter(matches.values()))
        if len(matches) > 1:
            names = sorted(matches)
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UnknownGPUError(f"GPU {query!r} is ambiguous: it matches {shown}; give the full name")
    keys = list(index.display)
    close = difflib.get_close_matches(stripped, keys, n=20, cutoff=0.0)
    suggestions: list[str] = []
    for key in close:
        name = index.display[key]
        if name not in suggestions:
            suggestions.append(name)
        if len(suggestions) == 5:
            break
    raise UnknownGPUError(
        f"unknown GPU {query!r}; closest names: {', '.join(suggestions)} "
        "(case, spaces and dashes are ignored)"
    )


def filter_gpus(
    vendor: Vendor | str | None = None,
    min_memory_bytes: int | None = None,
    segment: Segment | str | None = None,
    gpus: Iterable[GPU] | None = None,
) -> tuple[GPU, ...]:
    """GPUs matching every given criterion, in database order."""
    pool = tuple(gpus) if gpus is not None else load_gpus()
    want_vendor = _coerce(Vendor, vendor, "vendor")
    want_segment = _coerce(Segment, segment, "segment")
    if min_memory_bytes is not None and (isinstance(min_memory_bytes, bool) or min_memory_bytes < 0):
        raise ValueError(f"min_memory_bytes must be a non-negative number of bytes, got {min_memory_bytes!r}")
    return tuple(
        g
        for g in pool
        if (want_vendor is None or g.vendor is want_vendor)
        and (want_segment is None or g.segment is want_segment)
        and (min_memory_bytes is None or g.memory_bytes >= min_memory_bytes)
    )


def _coerce(enum_type: type[enum.Enum], value: Any, what: str) -> Any:
    if value is None:
        return None
    try:
        return enum_type(value)
    except ValueError:
        options = ", ".join(member.value for member in enum_type)
        raise ValueError(f"unknown {what} {value!r}; expected one of: {options}") from None

