"""`trainer.profile`: torch.profiler over a window of training steps.

The trainer starts the profiler one step before the window (a warm-up step, whose records are
dropped: the profiler's own start-up cost lands there), records `trainer.profile.steps` steps
and then writes, per recording rank, under `run_dir/profile/step{first}-{last}/`:

- `rank{r}.trace.json.gz`: the Chrome/Perfetto trace (open it in https://ui.perfetto.dev or
  chrome://tracing; TensorBoard's profiler plugin reads it too);
- `rank{r}.summary.txt`: torch's table of the operators (and, on a GPU, the kernels) that took
  the most time, then the loop's own regions (`data`, `forward_backward`, `optimizer_step`).

`summarize` condenses the same figures into the `profile` event that rank 0 logs: where each
step's time went, per region and per top kernel (or CPU operator), and on a GPU how busy the
device was over the recorded steps. The profiler itself is torch's; only this reading of its
results is ours.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

REGIONS = ("data", "forward_backward", "optimizer_step")  # the loop's parts, as annotated
TOP = 10  # kernels (or CPU operators) listed in the logged event


class StepProfiler:
    """Profiles steps `start .. start + steps - 1` (1-based, as the metrics count them).

    Args:
        cfg: `trainer.profile` (start_step, steps, ranks, record_shapes, profile_memory,
            with_stack, row_limit).
        run_dir: the run directory; files go to `run_dir/profile/`.
        rank: this process's rank; it records only when listed in `cfg.ranks` (empty: all).
        device: the training device (CUDA adds the device's kernels to the trace).
        first_step: the first step this run will take (after a resume, steps before it are
            gone and a window that started before it is not recorded).
    """

    def __init__(self, cfg: Any, run_dir: Path, rank: int, device: torch.device,
                 first_step: int) -> None:  # fmt: skip
        self.start = int(cfg.start_step)
        self.steps = int(cfg.steps)
        self.last = self.start + self.steps - 1
        ranks = list(cfg.ranks)
        self.enabled = self.start > 0 and first_step <= self.start and (not ranks or rank in ranks)
        self.cfg = cfg
        self.first_step = first_step
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.directory = Path(run_dir) / "profile" / f"step{self.start}-{self.last}"
        self.warmup = 1 if self.start > first_step else 0
        self._profiler: profile | None = None
        self._step_times: list[float] = []
        self.result: dict[str, Any] | None = None

    def in_window(self, step: int) -> bool:
        """Whether step `step` runs under the profiler, its warm-up step included (slowed on
        the ranks that record, and through the collectives on the others)."""
        return (
            self.start > 0
            and self.first_step <= self.start
            and self.start - self.warmup <= step <= self.last
        )

    def before_step(self, step: int) -> None:
        """Called before step `step` (1-based) starts: starts the profiler when it is due."""
        if self.enabled and self._profiler is None and step == self.start - self.warmup:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profiler = profile(
                activities=activities,
                schedule=schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1),
                record_shapes=bool(self.cfg.record_shapes),
                profile_memory=bool(self.cfg.profile_memory),
                with_stack=bool(self.cfg.with_stack),
            )
            self._profiler.start()

    def region(self, name: str) -> contextlib.AbstractContextManager:
        """A named range in the trace (`data`, `forward_backward`, ...) while recording."""
        return record_function(name) if self._profiler is not None else contextlib.nullcontext()

    def after_step(self, step: int, step_time: float) -> dict[str, Any] | None:
        """Called after step `step`; after the window's last step, writes the trace and the
        summary and returns what `summarize` made of them (else None)."""
        if self._profiler is None:
            return None
        if step >= self.start:
            self._step_times.append(step_time)
        if step < self.last:
            self._profiler.step()
            return None
        profiler, self._profiler = self._profiler, None
        if self.cuda:
            torch.cuda.synchronize()
        profiler.stop()
        self.result = self._write(profiler)
        return self.result

    def close(self) -> None:
        """Stops a profiler still running (the run ended inside the window): nothing written."""
        if self._profiler is not None:
            with contextlib.suppress(Exception):
                self._profiler.stop()
            self._profiler = None

    def _write(self, profiler: profile) -> dict[str, Any]:
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"rank{self.rank}.trace.json.gz"
        partial = trace.with_name(f".{trace.name}.{os.getpid()}.json.gz")  # atomic: then renamed
        profiler.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        averages = profiler.key_averages()
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = averages.table(sort_by=sort_by, row_limit=int(self.cfg.row_limit))
        result = summarize(averages, self._step_times, cuda=self.cuda)
        lines = [
            f"kiln trainer.profile: rank {self.rank}, steps {self.start}-{self.last} "
            f"({len(self._step_times)} recorded), mean step {result['step_ms']:.2f} ms",
            "",
            table,
            "",
            "regions of the loop (ms per step, wall time on the host):",
            *(f"  {name:<16} {ms:10.3f}" for name, ms in result["regions"].items()),
        ]
        if self.cuda:
            lines.append(f"device busy (kernel time / step wall time): {result['device_busy']:.1%}")
        summary = self.directory / f"rank{self.rank}.summary.txt"
        partial_summary = summary.with_name(f".{summary.name}.{os.getpid()}")
        partial_summary.write_text("\n".join(lines) + "\n")
        os.replace(partial_summary, summary)
        print(f"kiln: profile of steps {self.start}-{self.last} (rank {self.rank}): {trace}",
              file=sys.stderr)  # fmt: skip
        return result | {"trace": str(trace), "summary": str(summary)}


def summarize(averages: Any, step_times: list[float], *, cuda: bool) -> dict[str, Any]:
    """Where the recorded steps' time went, per step.

    `averages` is the profiler's `key_averages()`. On a GPU the top list holds the device's
    kernels by their own time and `device_busy` is their total over the steps' wall time (below
    1, the device waited on the host: launch overhead, synchronisation, data). On the CPU it
    holds the operators by self CPU time. `share` is of the top list's measure summed over
    every entry; `regions` are the loop's annotated parts in host wall time.
    """
    steps = max(1, len(step_times))
    wall_ms = 1e3 * sum(step_times)
    regions = {name: 0.0 for name in REGIONS}
    entries = []
    for event in averages:
        if event.key in regions:
            regions[event.key] = event.cpu_time_total / 1e3 / steps  # microseconds -> ms
            continue
        if event.key.startswith("ProfilerStep#") or event.is_user_annotation:
            continue
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            own = event.self_device_time_total
        else:
            own = event.self_cpu_time_total
        if own > 0:
            entries.append((own, event.key, event.count))
    total = sum(own for own, _, _ in entries)
    entries.sort(reverse=True)
    top = [
        {"name": name, "ms_per_step": own / 1e3 / steps, "calls_per_step": count / steps,
         "share": own / total if total else 0.0}
        for own, name, count in entries[:TOP]
    ]  # fmt: skip
    result: dict[str, Any] = {
        "steps": len(step_times),
        "step_ms": wall_ms / steps,
        "regions": regions,
        "top": top,
        "measure": "self device time of each kernel" if cuda else "self CPU time of each operator",
    }
    if cuda:
        result["device_busy"] = (total / 1e3) / wall_ms if wall_ms else 0.0
    return result


def peak_tensor_bytes(step: Any) -> int:
    """The peak of live CPU tensor bytes allocated during `step()` beyond those live before it:
    torch's profiler with memory events reports the allocator's running total at every
    allocation and free, so no transient is missed (the CPU counterpart of
    `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; used by
    tests/pretrain/test_plan.py and bench/loss.py against `kiln plan`'s activation estimate)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, pending = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if type(event.extra_fields).__name__ == "_ExtraFields_Allocation":
            peak = max(peak, event.extra_fields.total_allocated)
    return peak
