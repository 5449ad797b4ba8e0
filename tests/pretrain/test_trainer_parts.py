"""Small parts of the training loop, tested without starting ranks."""

from __future__ import annotations

import gc

from pretrain.trainer import GarbageCollector, SpikeDetector


def test_spike_detector_flags_only_outliers() -> None:
    detector = SpikeDetector(window=50, threshold=4.0)
    flagged = [detector.add(3.0 + 0.01 * (i % 5)) for i in range(40)]
    assert flagged == [None] * 40
    assert detector.add(3.5) is not None  # far above a flat window
    assert detector.add(3.02) is None


def test_peak_tflops_is_detected_for_known_gpus() -> None:
    from pretrain.hardware import peak_tflops_for, resolve_peak_tflops

    names = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA GH200 480GB": 989.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA L4": 121.0,
        "NVIDIA A10G": 70.0,
        "AMD Instinct MI300X": 1307.0,
    }
    for name, tflops in names.items():
        assert peak_tflops_for(name) == tflops, name
    assert peak_tflops_for("Some Future Accelerator") is None
    assert resolve_peak_tflops(500.0, 989.0, "NVIDIA H100 PCIe") == (500.0, "trainer.peak_tflops")
    assert resolve_peak_tflops(0.0, 989.0, "NVIDIA H100 PCIe") == (
        756.0,
        "detected NVIDIA H100 PCIe",
    )
    assert resolve_peak_tflops(0.0, 0.1, None) == (0.1, "cluster.peak_tflops")  # CPU
    # CPU ranks of a cluster preset that describes GPUs (cluster=slurm cluster.accelerator=cpu)
    assert resolve_peak_tflops(0.0, 989.0, None, "H100-SXM") == (
        0.1, "CPU ranks (cluster.peak_tflops is a H100-SXM's)"
    )  # fmt: skip


def test_garbage_collector_freezes_start_up_and_collects_on_schedule() -> None:
    collections: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(seen)
    try:
        collector = GarbageCollector(every=3)
        assert not gc.isenabled() and gc.get_freeze_count() > 1000  # torch and friends frozen
        collections.clear()
        for step in (1, 2, 4, 5):
            collector.step(step)
        assert collections == []
        collector.step(6)
        assert collections == [1]  # the young generations only
        collector.full()
        assert collections == [1, 2]
        collector.stop()
        assert gc.isenabled() and gc.get_freeze_count() == 0

        automatic = GarbageCollector(every=0)  # Python's own schedule, start-up still frozen
        assert gc.isenabled() and gc.get_freeze_count() > 1000
        collections.clear()
        automatic.step(50)
        automatic.full()
        assert collections == []
        automatic.stop()
        assert gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(seen)
        gc.enable()
        gc.unfreeze()


def test_cpu_ranks_get_fixed_malloc_thresholds() -> None:
    """In-process (`mallopt`) unless the environment already chose, which is how torchrun's
    ranks get them (`malloc_env`, set by `run_torchrun`); a rank forked from the warm agent got
    its environment after its start, so it sets them whatever the environment says."""
    import os
    import subprocess
    import sys

    from pretrain.train import MALLOC_MMAP_THRESHOLD, malloc_env

    assert malloc_env()["MALLOC_MMAP_THRESHOLD_"] == str(MALLOC_MMAP_THRESHOLD) == "268435456"
    code = "from pretrain.train import tune_cpu_malloc; print(tune_cpu_malloc())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for env, expected in ((clean, "True"), (clean | malloc_env(), "False")):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert done.stdout.strip() == expected
    forced = code.replace("tune_cpu_malloc()", "tune_cpu_malloc(force=True)")
    for env, expected in ((clean | malloc_env(), "True"),
                          (clean | {"MALLOC_MMAP_THRESHOLD_": "lots"}, "False")):  # fmt: skip
        done = subprocess.run([sys.executable, "-c", forced], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert done.stdout.strip() == expected


def test_a_rank_without_a_gpu_is_told_which_setting_to_change() -> None:
    """More ranks per node than CUDA devices (the default cluster.gpus_per_node=8 on a smaller
    machine): a config error naming the fix, not torch's "invalid device ordinal" per rank."""
    from types import SimpleNamespace

    from pretrain.train import device_problem

    cluster = SimpleNamespace(gpus_per_node=8)
    assert device_problem(0, 2, cluster) is None and device_problem(1, 2, cluster) is None
    assert device_problem(2, 2, cluster) == (
        "local rank 2 has no GPU: this node has 2 CUDA device(s) for cluster.gpus_per_node=8 "
        "ranks; set cluster.gpus_per_node=2 (or make the devices visible: CUDA_VISIBLE_DEVICES)"
    )


def test_a_setting_added_since_a_checkpoint_is_no_change_at_its_default() -> None:
    """A resume compares the checkpoint's recorded config with this run's: a key the older
    kiln did not have (`objective.z_loss`, `engine.activation_checkpointing_every`) is not a
    change while it holds its default ("z_loss=None (now 0.0)" was said on every resume), and
    is one when this run sets it."""
    import dataclasses
    import json

    from pretrain.config import CausalLMConfig, DDPEngineConfig
    from pretrain.preflight import config_differences

    @dataclasses.dataclass
    class Run:
        engine: DDPEngineConfig
        objective: CausalLMConfig

    def recorded(run: Run) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(run), default=str))

    old = recorded(Run(DDPEngineConfig(), CausalLMConfig()))
    del old["engine"]["activation_checkpointing_every"], old["objective"]["z_loss"]
    run = Run(DDPEngineConfig(), CausalLMConfig())
    assert config_differences(old, recorded(run), prefix="", current=run) == []
    assert config_differences(old, recorded(run), prefix="") == [
        ".engine.activation_checkpointing_every=None (now 1)", ".objective.z_loss=None (now 0.0)"
    ]  # fmt: skip
    run.objective.z_loss = 1e-4
    assert config_differences(old, recorded(run), prefix="", current=run) == [
        ".objective.z_loss=None (now 0.0001)"
    ]
