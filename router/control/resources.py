"""What this host has (CPU, memory, ISA features, OpenVINO devices, CUDA GPUs through NVML) and
what each served engine holds (threads, KV cache, weights): the control plane's resource view,
and the memory check that refuses a deployment the host cannot hold.

Memory is the resource a deployment can exhaust: each local replica allocates its KV cache
(slots x context x bytes per token, plus its prefix-cache pool) and its weights up front, so
the ledger adds them and a new replica must fit in what is left of the allocatable memory
(MemTotal less a reserve for the OS and the router itself). CPU threads are reported, not
refused: oversubscribed cores slow every model down, they do not fail a load.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backends.cpu import cpu_info
from backends.factory import kv_value_bytes, native_copy_bytes, openvino_devices, unloaded_files
from router.config import REMOTE_BACKENDS, ModelConfig
from router.errors import ResourceExhausted
from router.models.prepare import read_manifest
from router.serving.model import ServedModel

logger = logging.getLogger(__name__)

ISA_FEATURES = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""CPU flags that decide which kernels the engines run, as /proc/cpuinfo spells them."""
RESERVE_FRACTION = 0.10
RESERVE_MIN_BYTES = 1 << 30
"""Memory kept out of the ledger for the OS and the router's own (Python, caches, buffers)."""


Absent = tuple[str, str]
"""(kind, why) for a kind of device this host does not have."""


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    """'CPU', 'GPU.0', 'NPU' (OpenVINO) or 'cuda:0' (NVML)."""
    kind: str
    """'openvino' or 'cuda'."""
    description: str
    memory_bytes: int = 0
    """A CUDA GPU's memory; 0 where not known."""


@dataclass(frozen=True, slots=True)
class Host:
    cpu_model: str
    cores: int
    """Cores this process may run on (its affinity)."""
    isa_features: tuple[str, ...]
    memory_total_bytes: int
    memory_available_bytes: int
    devices: tuple[Device, ...]
    absent: tuple[Absent, ...]
    """(what, why) for device kinds not present: 'cuda', 'npu', 'openvino-gpu'."""

    @property
    def allocatable_bytes(self) -> int:
        reserve = max(RESERVE_MIN_BYTES, int(self.memory_total_bytes * RESERVE_FRACTION))
        return max(0, self.memory_total_bytes - reserve)


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one served engine holds."""

    model: str
    """The served name (a model, or a deployment)."""
    replica: str
    """The replica's name within its deployment; '' for a model."""
    device: str
    threads: int
    kv_bytes: int
    weight_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.kv_bytes + self.weight_bytes


def _meminfo() -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                found[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return found


def _cpu() -> tuple[str, tuple[str, ...]]:
    model, flags = cpu_info()
    model = model or platform.processor() or platform.machine()
    return model, tuple(f for f in ISA_FEATURES if f in flags)


def _cuda() -> tuple[list[Device], str]:
    """CUDA GPUs through NVML, or why there are none."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML cannot start: {exc} (no NVIDIA driver on this host)"
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            devices.append(Device(f"cuda:{i}", "cuda", str(name), int(memory)))
        return devices, "" if devices else "NVML sees no GPU"
    finally:
        pynvml.nvmlShutdown()


@functools.cache
def _static_inventory() -> tuple[
    str, tuple[str, ...], tuple[Device, ...], tuple[tuple[str, str], ...]
]:
    """What does not change while the router runs (probed once: OpenVINO and NVML are slow to
    start)."""
    model, isa = _cpu()
    devices: list[Device] = []
    absent: list[Absent] = []
    try:
        devices += [Device(name, "openvino", full) for name, full in openvino_devices()]
    except Exception as exc:  # a broken plugin must not hide the rest of the inventory
        absent.append(("openvino", f"{type(exc).__name__}: {exc}"))
    names = {d.name.split(".")[0] for d in devices}
    for kind in ("GPU", "NPU"):
        if kind not in names:
            absent.append((f"openvino-{kind.lower()}", f"OpenVINO finds no {kind} on this host"))
    cuda, why = _cuda()
    devices += cuda
    if why:
        absent.append(("cuda", why))
    return model, isa, tuple(devices), tuple(absent)


def host() -> Host:
    """The host now (memory is read fresh; devices were probed once)."""
    model, isa, devices, absent = _static_inventory()
    info = _meminfo()
    return Host(
        cpu_model=model,
        cores=len(os.sched_getaffinity(0)),
        isa_features=isa,
        memory_total_bytes=info.get("MemTotal", 0),
        memory_available_bytes=info.get("MemAvailable", 0),
        devices=devices,
        absent=absent,
    )


def _folder_bytes(folder: Path, skip: Iterable[Path] = ()) -> int:
    """Bytes of a prepared model's files (its derived OpenVINO IR and `skip` aside)."""
    total, skipped = 0, set(skip)
    for path in folder.glob("*"):
        if path.is_file() and path not in skipped:
            total += path.stat().st_size
    return total


def need(config: ModelConfig, model_dir: Path) -> tuple[int, int]:
    """(KV bytes, weight bytes) a local engine of `config` allocates; (0, 0) for a remote one."""
    if config.backend in REMOTE_BACKENDS:
        return 0, 0
    unloaded = unloaded_files(
        config.backend,
        model_dir,
        prefill_graph=config.prefill_graph,
        decode_kernel=config.decode_kernel,
    )
    weights = _folder_bytes(model_dir, unloaded)
    manifest = read_manifest(model_dir) or {}
    if config.kind != "generate" or "num_layers" not in manifest:
        return 0, weights
    weights += native_copy_bytes(config.backend, model_dir, decode_kernel=config.decode_kernel)
    per_token = (
        2 * manifest["num_layers"] * manifest["num_kv_heads"] * manifest["head_dim"]
    ) * kv_value_bytes(
        config.backend,
        model_dir,
        prefill_graph=config.prefill_graph,
        decode_kernel=config.decode_kernel,
    )
    kv = config.max_slots * config.max_context * per_token + config.prefix_cache_mb * (1 << 20)
    return kv, weights


def allocations(models: Iterable[ServedModel]) -> list[Allocation]:
    """What every served engine holds: models, and each deployment's replicas."""
    found = []
    for model in models:
        engines = model.replicas if model.deployment is not None else (model,)
        for engine in engines:
            if not engine.loaded and not engine.ready:
                continue  # not loaded (failed, or stopped): holds nothing
            kv, weights = need(engine.config, engine.model_dir)
            remote = engine.config.backend in REMOTE_BACKENDS
            found.append(
                Allocation(
                    model=model.name,
                    replica=engine.replica.name if engine.replica is not None else "",
                    device="remote" if remote else engine.config.device,
                    threads=0 if remote else engine.config.threads,
                    kv_bytes=kv,
                    weight_bytes=weights,
                )
            )
    return found


def check_fits(
    models: Iterable[ServedModel], config: ModelConfig, model_dir: Path, count: int
) -> None:
    """ResourceExhausted, naming what is free, when `count` more local engines of `config`
    do not fit in the memory left."""
    kv, weights = need(config, model_dir)
    wanted = count * (kv + weights)
    if wanted == 0:
        return
    here = host()
    allocated = sum(a.memory_bytes for a in allocations(models))
    free = here.allocatable_bytes - allocated
    if wanted > free:
        mib = 1 << 20
        raise ResourceExhausted(
            f"{count} replica(s) of {config.name!r} need {wanted // mib} MiB "
            f"({kv // mib} MiB KV cache + {weights // mib} MiB weights each) but "
            f"{max(0, free) // mib} MiB is free ({here.allocatable_bytes // mib} MiB allocatable, "
            f"{allocated // mib} MiB held by what is served); lower max_slots, max_context or "
            "prefix_cache_mb, or free a deployment",
            retry_after_s=60.0,
        )
