"""Node gauges read at scrape time: free disk of the data dir (`disk_free_gb`) and the memory use
of each GPU on the node (`gpu_memory_usage_percent`, from NVML through `nvidia-ml-py`, imported
lazily). On a machine without NVML (no NVIDIA driver, or the package not installed) the GPU
family is absent from /metrics altogether rather than reported as 0."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

BYTES_PER_GB = 1e9  # decimal gigabytes, as `df -H` shows them


class DiskCollector(Collector):
    """`disk_free_gb`: free space, in GB (10^9 bytes), of the volume holding the data dir."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)

    def describe(self) -> list[GaugeMetricFamily]:  # the name, for the registry's clash check
        return [GaugeMetricFamily("disk_free_gb", "")]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        path = self.data_dir
        while not path.exists() and path != path.parent:  # not created yet: its volume
            path = path.parent
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            logger.warning("disk usage of %s unreadable", path, exc_info=True)
            return
        yield GaugeMetricFamily("disk_free_gb", "Free space on the volume of the CineVivid data dir, in GB "
                                "(10^9 bytes)", value=free / BYTES_PER_GB)


class NvmlGpuCollector(Collector):
    """`gpu_memory_usage_percent{gpu="<index>"}`: used / total memory of every GPU NVML sees on this
    node (NVML ignores CUDA_VISIBLE_DEVICES, so an ingress replica without a GPU share still
    reports the node's GPUs). NVML is initialised on the first scrape; if that fails the
    collector yields nothing from then on."""

    def __init__(self) -> None:
        self._nvml = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()

    def describe(self) -> list[GaugeMetricFamily]:  # the name, for the registry's clash check
        return [GaugeMetricFamily("gpu_memory_usage_percent", "", labels=["gpu"])]

    def _init(self):
        with self._lock:
            if self._nvml is None and self._unavailable is None:
                try:
                    import pynvml  # nvidia-ml-py

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                    logger.info("NVML: %d GPU(s) on this node", pynvml.nvmlDeviceGetCount())
                except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no driver), ...
                    self._unavailable = f"{type(exc).__name__}: {exc}"
                    logger.info("no GPU metrics: NVML unavailable (%s)", self._unavailable)
            return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._init()
        if nvml is None:
            return
        samples = []
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
                if mem.total:
                    samples.append((str(i), 100.0 * mem.used / mem.total))
        except Exception:  # noqa: BLE001 - a GPU fell off the bus: report what we read
            logger.warning("NVML read failed", exc_info=True)
        if not samples:
            return
        family = GaugeMetricFamily("gpu_memory_usage_percent", "Memory in use on each GPU of this node, in "
                                   "percent of its total (NVML)", labels=["gpu"])
        for gpu, pct in samples:
            family.add_metric([gpu], pct)
        yield family
