"""Peak dense bf16 throughput of known accelerators: the denominator of MFU.

Figures are the vendors' dense (not 2:4 sparse) bf16 tensor-core TFLOP/s per device, as
PaLM/Megatron MFU reports use them. `torch.cuda.get_device_name()` strings are matched in
order, most specific first (an "H100 PCIe" is not an SXM part).
"""

from __future__ import annotations

# (substring of the device name, TFLOP/s): first match wins
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """The table's figure for a device name, or None for a device it does not know."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# CPU ranks' figure when the cluster's is a GPU's (cluster=slurm or ray with
# cluster.accelerator=cpu): cluster=local_cpu's, the order of a few cores' fp32 matmuls
CPU_PEAK_TFLOPS = 0.1


def resolve_peak_tflops(configured: float, cluster_value: float, device_name: str | None,
                        cluster_device: str = "cpu") -> tuple[float, str]:  # fmt: skip
    """(peak TFLOP/s per device, where it came from) for MFU: `trainer.peak_tflops` when set
    (> 0); else the table's figure for the device running (CUDA); else `cluster.peak_tflops`,
    unless the ranks run on CPUs (`device_name` None) and the cluster describes a GPU
    (`cluster_device`, its gpu_name): an MFU against an H100's 989 TFLOP/s says nothing."""
    if configured > 0:
        return configured, "trainer.peak_tflops"
    if device_name:
        detected = peak_tflops_for(device_name)
        if detected is not None:
            return detected, f"detected {device_name}"
    elif cluster_device.lower() != "cpu":
        return CPU_PEAK_TFLOPS, f"CPU ranks (cluster.peak_tflops is a {cluster_device}'s)"
    return cluster_value, "cluster.peak_tflops"
