"""bench/gpu.py's CPU smoke mode (issue #9): every stage of the GPU script still runs, on the
CPU, through the real `kiln data`, `kiln train`, `kiln plan` and the plain loop, and its JSON
holds the figures the GPU run reports, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TRAINER_RUNS = {"gpt2_124m", "gpt2_350m", "gpt2_124m_docmask", "moe", "gpt2_124m_blocks",
                "moe_loop", "gpt2_124m_fsdp", "gpt2_124m_fsdp_chunked", "gpt2_124m_float8"}  # fmt: skip
PLAIN_RUNS = {"plain_124m": "gpt2_124m", "plain_124m_docmask": "gpt2_124m_docmask"}
# the extras whose code differs on the CPU; the others (compile modes, attention kernels) run
# as gpt2_124m does with compile off and no CUDA: `--check` resolves and plans them
EXTRAS = ["moe_loop", "gpt2_124m_fsdp", "gpt2_124m_fsdp_chunked", "gpt2_124m_float8"]


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_script_smoke_mode(tmp_path: Path) -> None:
    results_path = tmp_path / "gpu.json"
    markdown = tmp_path / "BENCHMARKS.md"
    log = tmp_path / "gpu.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "bench/gpu.py", "--smoke", "--results", str(results_path),
             "--extra", ",".join(EXTRAS)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # the results file is rewritten after every stage (atomically: always whole JSON), so
        # a run cut short by a device's time limit keeps what it measured
        snapshots: list[tuple[int, int]] = []
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            if results_path.is_file():
                partial = json.loads(results_path.read_text())
                if partial["partial"]:
                    snapshots.append((len(partial["stages"]), len(partial["runs"])))
            time.sleep(0.2)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    assert process.returncode == 0, log.read_text()[-8000:]
    assert len(set(snapshots)) >= 5 and snapshots == sorted(snapshots), snapshots
    results = json.loads(results_path.read_text())
    assert results["smoke"] is True and results["failed"] is False and results["partial"] is False

    # every stage ran and was timed
    stages = results["stages"]
    assert set(stages) == {"env", "matmul", "data", *TRAINER_RUNS, *PLAIN_RUNS}
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage)
        assert stage["seconds"] >= 0
    assert stages["env"]["result"]["device"] == "cpu"
    assert positive(stages["matmul"]["result"]["tflops"])
    assert stages["data"]["result"]["built_here"] is True  # `kiln data` built the shards
    assert stages["data"]["result"]["vocab_size"] == 1000
    assert results["runtime_seconds"] <= results["budget_seconds"]

    runs = results["runs"]
    assert set(runs) == TRAINER_RUNS | set(PLAIN_RUNS)
    for name in TRAINER_RUNS:
        run = runs[name]
        assert run["steps"] == results["steps"] == 6
        for key in ("step_ms", "tokens_per_s", "tflops", "mfu_989", "mfu_measured_peak",
                    "peak_memory_gib", "plan_memory_gib", "memory_ratio"):  # fmt: skip
            assert positive(run[key]), (name, key, run[key])
        # tokens/s over the wall clock between the timed steps' records (logging included)
        assert run["tokens_per_s"] == pytest.approx(
            run["batch"] * run["seq"] / (run["wall_ms"] / 1e3)
        )
        assert run["tokens_per_s_median_step"] == pytest.approx(
            run["batch"] * run["seq"] / (run["step_ms"] / 1e3)
        )
        assert run["wall_ms"] >= run["step_ms_mean"] * 0.9  # the records' times: 1 ms apart
        assert run["data_wait_ms"] >= 0 and 0 <= run["data_wait_fraction"] < 1
        # engine=ddp: plain data parallel; an extra run may name its own engine
        expected = "fsdp" if name.startswith("gpt2_124m_fsdp") else "zero0"
        assert run["plan"]["strategy"] == expected, name
        assert run["plan"]["total_bytes"] > run["plan"]["model_states_bytes"] > 0
        assert run["mfu_989"] == pytest.approx(run["tflops"] / 989.0)
        assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"])
    engines = [o for o in runs["gpt2_124m_fsdp"]["overrides"] if o.startswith("engine=")]
    assert engines == ["engine=fsdp"]  # the run's own engine replaces the script's
    # the MoE run is the MoE preset: more parameters than are active per token
    assert runs["moe"]["plan"]["params_total"] > runs["moe"]["plan"]["params_active"]
    # the nanoGPT-shaped runs turn document masking off, the _docmask run keeps kiln's default
    assert "data.document_masking=false" in runs["gpt2_124m"]["overrides"]
    assert "data.document_masking=false" not in runs["gpt2_124m_docmask"]["overrides"]
    # the speed-up's "before": the same run with each block compiled on its own
    after, before = (set(runs[name]["overrides"]) for name in ("gpt2_124m", "gpt2_124m_blocks"))
    assert {o for o in before ^ after if not o.startswith("trainer.")} == {
        "engine.compile_scope=blocks"
    }
    # trainer.profile records 3 steps after the 6 timed ones and a warm-up step (by default
    # gpt2_124m and gpt2_350m); the figures above leave them out
    for name in TRAINER_RUNS:
        profile = runs[name].get("profile")
        assert (profile is not None) == (name in ("gpt2_124m", "gpt2_350m")), name
        if profile is None:
            assert not any(o.startswith("trainer.profile") for o in runs[name]["overrides"])
            continue
        assert "trainer.profile.start_step=8" in runs[name]["overrides"]  # 7 warms up
        assert profile["steps"] == "8-10" and positive(profile["step_ms"])
        assert profile["device_busy"] is None  # only on a GPU
        assert profile["regions_ms"]["forward_backward"] > 0
        assert 1 <= len(profile["top"]) <= 10 and all(
            positive(t["ms_per_step"]) for t in profile["top"]
        )
        assert profile["summary"].startswith("kiln trainer.profile: rank 0, steps 8-10")
    for plain_name, trainer_name in PLAIN_RUNS.items():
        plain, trainer = runs[plain_name], runs[trainer_name]
        assert plain["of"] == trainer_name and plain["steps"] == trainer["steps"]
        assert positive(plain["tokens_per_s"]) and positive(plain["mfu_989"])
        assert plain["flops_per_token"] == trainer["flops_per_token"]
        assert math.isfinite(plain["loss_last"])
    assert "document_ids" in runs["plain_124m_docmask"]["batch_keys"]  # the loader's own keys
    assert "document_ids" not in runs["plain_124m"]["batch_keys"]

    # every target is reported with its value and a verdict; memory has none on the CPU
    checks = {c["label"]: c for c in results["checks"]}
    assert len(checks) == 2 + 2 + 1 + 1 + len(EXTRAS) + len(TRAINER_RUNS)
    tried = checks["moe_loop (model.moe.grouped_gemm=false) / moe: tokens/s"]
    assert tried["verdict"] == "n/a" and positive(tried["value"])
    assert "model.moe.grouped_gemm=false" in runs["moe_loop"]["overrides"]
    # an extra run is compared with the run it varies: the chunked FSDP2 one with FSDP2's
    tried = checks[
        "gpt2_124m_fsdp_chunked (engine=fsdp engine.loss_chunk_tokens=2048) "
        "/ gpt2_124m_fsdp: tokens/s"
    ]
    assert tried["verdict"] == "n/a" and positive(tried["value"])
    speedup = next(c for label, c in checks.items() if "compile_scope=loss" in label)
    assert speedup["verdict"] == "n/a" and positive(speedup["value"])
    for check in checks.values():
        assert check["verdict"] in ("PASS", "FAIL", "n/a") and check["value"] is not None
    assert all(c["verdict"] == "n/a" for label, c in checks.items() if "memory" in label)
    vs_plain = [c for label, c in checks.items() if "plain PyTorch loop" in label]
    assert len(vs_plain) == 2 and all(c["verdict"] in ("PASS", "FAIL") for c in vs_plain)

    # the markdown section renders from the JSON
    rendered = subprocess.run(
        [sys.executable, "bench/gpu.py", "--render", str(results_path), "--markdown", str(markdown)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    text = markdown.read_text()
    assert "<!-- bench:gpu:start -->" in text and "<!-- bench:gpu:end -->" in text
    assert "| gpt2_124m |" in text and "target >= 0.95x" in text
    assert "### Where the step time goes" in text and "**gpt2_350m**, steps 8-10" in text
    assert "| top by self CPU time of each operator | ms per step |" in text

    # two calls' results (e.g. one per device budget) render as one section, against a
    # recorded run: each run beside its counterpart there
    first, second = json.loads(results_path.read_text()), json.loads(results_path.read_text())
    for name in ("moe", "gpt2_124m_blocks"):
        first["runs"].pop(name)
        first["stages"][name] = {"status": "skipped (--skip)", "seconds": 0.0}
    for name in [n for n in second["runs"] if n not in ("moe", "gpt2_124m_blocks")]:
        second["runs"].pop(name)
        second["stages"][name] = {"status": "skipped (--skip)", "seconds": 0.0}
    second["date"] = "the second call"
    before = json.loads(results_path.read_text())
    before |= {"date": "2026-01-01 00:00 UTC", "commit": "0123abc"}
    for run in before["runs"].values():
        run["tokens_per_s"] /= 2
    before["runs"]["gpt2_124m"]["overrides"] = [
        o.replace("engine=ddp", "engine=fsdp") for o in before["runs"]["gpt2_124m"]["overrides"]
    ]
    for name in EXTRAS:  # the recorded run had none of the extras
        before["runs"].pop(name)
    paths = []
    for name, part in (("first", first), ("second", second), ("before", before)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(part))
    merged_md = tmp_path / "MERGED.md"
    rendered = subprocess.run(
        [sys.executable, "bench/gpu.py", "--render", str(paths[0]), str(paths[1]),
         "--before", str(paths[2]), "--markdown", str(merged_md)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    text = merged_md.read_text()
    assert f"commit {results['commit']}" in text and "; then `bench/gpu.py --smoke" in text
    assert "the second call" in text
    for name in runs:  # the union of both calls' runs
        assert f"| {name} |" in text, name
    assert "### Before and after: against the run of 2026-01-01 00:00 UTC (commit 0123abc)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| gpt2_124m", "| moe -> "))]
    by_pair = {line.split(" | ")[0][2:]: line for line in rows if " -> " in line.split(" | ")[0]}
    # the same name; an extra against the run it varies, else its preset's run
    assert {"gpt2_124m -> gpt2_124m", "gpt2_124m -> gpt2_124m_fsdp", "moe -> moe",
            "moe -> moe_loop", "gpt2_124m -> gpt2_124m_float8",
            "gpt2_124m -> gpt2_124m_fsdp_chunked"} <= set(by_pair)  # fmt: skip
    assert "| `engine=ddp` (`engine=fsdp`) |" in by_pair["gpt2_124m -> gpt2_124m"]
    # the same engine and settings then and now: only the code changed
    assert "| gpt2_124m -> gpt2_124m_fsdp | - |" in by_pair["gpt2_124m -> gpt2_124m_fsdp"]
    assert (
        "| `engine.float8=true` `engine=ddp` (`engine=fsdp`) |"
        in (by_pair["gpt2_124m -> gpt2_124m_float8"])
    )
    assert "| 2.000x |" in by_pair["moe -> moe"]  # tokens/s halved in the "before"
    # parts measured with other settings are refused by name
    second["steps"] = 7
    paths[1].write_text(json.dumps(second))
    refused = subprocess.run(
        [sys.executable, "bench/gpu.py", "--render", str(paths[0]), str(paths[1]),
         "--markdown", str(merged_md)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "differ in 'steps'" in refused.stderr


def test_check_mode_resolves_every_gpu_stage_and_names_the_ones_that_do_not() -> None:
    """`bench/gpu.py --check`: every GPU stage's own overrides (full size, bf16, compiled; the
    extras too) composed, validated and planned as `kiln plan` does, in one process on the CPU,
    so a stage whose config no longer composes fails in CI, not on a rented GPU."""
    done = subprocess.run([sys.executable, "bench/gpu.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[gpu --check] ")]
    assert len(lines) == 18 + 1 and lines[-1].endswith("18 of 18 stages resolve")
    assert "[gpu --check] gpt2_124m_fsdp: ok, plan fsdp " in done.stdout  # its own engine
    assert "[gpu --check] gpt2_350m: ok, plan zero0 " in done.stdout
    # under DeepSpeed the FP8 stages cannot run (engine.float8 is DDP and FSDP2 only): named
    keep = {"gpt2_124m", "gpt2_124m_float8"}
    sys.path.insert(0, str(REPO))
    from bench.gpu import TRAINER_RUNS as ALL_RUNS

    skip = [name for name in ALL_RUNS if name not in keep]
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--check", "--engine", "zero2", "--skip", ",".join(skip)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:]
    assert "[gpu --check] gpt2_124m: ok, plan zero2 " in done.stdout
    failed = next(line for line in done.stdout.splitlines() if "gpt2_124m_float8:" in line)
    assert "FAILED" in failed and "float8" in failed, failed
    said = next(
        line for line in done.stdout.splitlines() if "gpt2_124m_float8's overrides:" in line
    )
    assert "engine.float8=true" in said and "engine=zero2" in said, said
    assert "1 of 2 stages resolve; failed: gpt2_124m_float8" in done.stdout


def test_the_recorded_h200_run_renders_with_its_own_wall_clock(tmp_path: Path) -> None:
    """The recorded H200 run (issue #9's "before") predates wall-clock tokens/s: re-rendered,
    its table takes tokens/s and MFU from the interval between the trainer's records, and the
    section says where that older script's work differed from today's prose."""
    markdown = tmp_path / "BENCHMARKS.md"
    rendered = subprocess.run(
        [sys.executable, "bench/gpu.py", "--render", "bench/results/gpu_h200_2026-11-28.json",
         "--before", "", "--markdown", str(markdown)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    text = markdown.read_text()
    assert "- Recorded by an older `bench/gpu.py`" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| ")}  # fmt: skip
    # moe: median step 278.33 ms, 1,540.63 ms between records: 16 x 1024 / 1.54063 s
    assert rows["moe"][1:4] == ["278.33", "1540.63", "10,635"]
    assert rows["plain_124m"][1:4] == ["44.62", "44.62", "367,191"]  # a plain loop: its step
    # the checks are the recorded ones (median step): 210,659 / 478,600
    assert "478,600 tokens/s (no document masking, nanoGPT's work): 0.440x" in text
