"""`kiln data`: raw corpora -> cleaned, deduplicated documents -> tokenizer -> token shards.

The driver plans deterministic work units, runs each stage's per-unit work (`stages.py`) as Ray
tasks, and writes the manifest and report. Stages, in order:

    scan       read -> normalize -> filter -> content hash and MinHash      (one task per unit)
    select     exact and near dedup, validation split, tokenizer sample     (one task)
    tokenizer  gather the sample (a task per unit), train SentencePiece     (one task)
    tokenize   encode surviving documents                                   (one task per unit)
    shard      cut each source and split into WebDataset tars               (one task per shard)

Determinism: units, dedup decisions, splits, the tokenizer sample and shard boundaries are
functions of the config and the input files in their global order (sources in config order,
files sorted, documents in file order), never of the number of workers or the order tasks
finish in. Crash safety: every file is written under a temporary name and renamed; each unit's
stage ends with a marker in `OUT/.work/`, so a rerun skips finished work. A config fingerprint
stored with the work (and in the manifest) stops a rerun with another config from mixing
outputs unless `overwrite=true`.

Ray workers read and write `OUT` directly, so on a multi-node Ray cluster `output_dir` must be
on a file system every node mounts (NFS, Lustre, a FUSE-mounted bucket).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import stages
from data_pipeline.shards import (
    FORMAT_VERSION,
    SPLITS,
    Manifest,
    ShardFormatError,
    ShardRecord,
    TokenizerRecord,
    atomic_write_bytes,
    read_manifest,
    sha256_file,
    verify_shard,
    write_manifest,
)
from data_pipeline.sources import (
    DOCUMENTS_READ,
    SKIP_REASONS,
    SourceError,
    WorkUnit,
    expand_paths,
    plan_units,
    stdlib_dir,
)
from pretrain.config import KilnConfig, RayConfig

# Bump when a change to the pipeline's code changes its outputs for the same config, so a
# resume never mixes work done by two versions.
PIPELINE_VERSION = 3
WORK_DIR = ".work"
TOKENIZER_FILE = "tokenizer.model"
ERROR_REASONS = tuple(reason for reason in SKIP_REASONS if reason != "empty")
OWNED = ("manifest.json", "report.json", TOKENIZER_FILE, "shards", WORK_DIR)  # overwrite=true
log = logging.getLogger("kiln.data")


class PipelineError(RuntimeError):
    """A condition the user must act on (refused output dir, too much bad input, ...)."""


# --------------------------------------------------------------------------------------------
# planning and fingerprint


@dataclass
class SourcePlan:
    name: str
    weight: float
    files: int
    bytes: int
    inputs_digest: str  # hash of the files' relative paths, sizes and modification times
    units: list[WorkUnit] = field(default_factory=list)


def plan_sources(cfg: KilnConfig) -> list[SourcePlan]:
    """Expand every source and cut it into work units.

    A source is cut into units of at most `shards.unit_bytes`, and small sources into about
    `shards.min_units` units of at least `shards.min_unit_bytes` so a small corpus still uses
    every worker.
    """
    if not cfg.corpus.sources:
        raise PipelineError("corpus.sources is empty: name at least one source")
    plans = []
    for source in cfg.corpus.sources:
        try:
            files = expand_paths(source)
        except SourceError as error:
            raise PipelineError(str(error)) from error
        stats = [_stat(path) for path in files]
        sizes = [size for size, _ in stats]
        total = sum(sizes)
        shards = cfg.shards
        target = min(shards.unit_bytes, max(shards.min_unit_bytes, -(-total // shards.min_units)))
        root = stdlib_dir() if source.format == "stdlib" else None
        try:
            units = plan_units(source.name, files, source.format, target, source.text_field, root)
        except SourceError as error:
            raise PipelineError(f"source {source.name!r}: {error}") from error
        base = units[0].root if units else "/"
        digest = hashlib.sha256()
        for path, (size, mtime) in zip(files, stats, strict=True):
            # the modification time too: a file edited in place at the same size (a fix to a
            # few characters) is other input; hashing every byte would read the corpus twice
            line = f"{os.path.relpath(path, base)}\0{size}\0{mtime}\n"
            digest.update(line.encode("utf-8", "replace"))
        plans.append(
            SourcePlan(source.name, source.weight, len(files), total, digest.hexdigest(), units)
        )
    return plans


def _stat(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of an input file; (0, 0) when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return 0, 0
    return stat.st_size, stat.st_mtime_ns


def fingerprint_payload(cfg: KilnConfig, plans: list[SourcePlan]) -> dict[str, Any]:
    """Everything the outputs depend on: the settings of each stage, the input files' names
    and sizes, the versions of the code and of SentencePiece. Not: workers, output_dir."""
    import sentencepiece

    tokenizer = asdict(cfg.tokenizer)
    if cfg.tokenizer.path is not None:
        path = Path(cfg.tokenizer.path)
        if not path.is_file():
            raise PipelineError(f"tokenizer.path={cfg.tokenizer.path}: no such file")
        from data_pipeline.tokenizer import load_tokenizer_info

        try:  # what the tokenizer stage would find after scan and dedup, found before them
            load_tokenizer_info(path)
        except (ValueError, RuntimeError, OSError) as error:  # SentencePiece's: RuntimeError
            raise PipelineError(
                f"tokenizer.path: {error} (kiln needs pad, unk, bos, eos and <mask>)"
            ) from error
        tokenizer = {"path": path.name, "sha256": sha256_file(path)}
    return {
        "versions": {
            "format": FORMAT_VERSION,
            "pipeline": PIPELINE_VERSION,
            "sentencepiece": sentencepiece.__version__,
        },
        "corpus": asdict(cfg.corpus),
        "inputs": {
            plan.name: {"files": plan.files, "bytes": plan.bytes, "digest": plan.inputs_digest}
            for plan in plans
        },
        "normalize": asdict(cfg.normalize),
        "filters": asdict(cfg.filters),
        "dedup": asdict(cfg.dedup),
        "tokenizer": tokenizer,
        "split": asdict(cfg.split),
        "shards": asdict(cfg.shards),
    }


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        items: dict[str, Any] = {}
        for key, value in data.items():
            items |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return items
    if isinstance(data, list):
        items = {}
        for index, value in enumerate(data):
            items |= _flatten(value, f"{prefix}[{index}]")
        return items or {prefix: []}
    return {prefix: data}


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> str:
    """The keys whose values differ between two fingerprint payloads, for an error message."""
    before, after = _flatten(old), _flatten(new)
    changed = [
        key for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)
    ]
    parts = [
        f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}"
        for key in changed[:limit]
    ]
    if len(changed) > limit:
        parts.append(f"and {len(changed) - limit} more")
    return "; ".join(parts) or "the pipeline version"


# --------------------------------------------------------------------------------------------
# output directory state


def prepare_output(out: Path, payload: dict[str, Any], fp: str, overwrite: bool) -> str:
    """Decide what to do with `out`: "fresh", "resume" or "complete" (nothing to do).
    `overwrite` deletes kiln's outputs there (`OWNED`) and starts afresh, whatever they are:
    a build of another config, a damaged one, or one whose inputs changed unseen.

    Raises:
        PipelineError: `out` holds outputs of another config (or foreign files in `shards/`)
            and `overwrite` is false; or a finished build whose files were damaged.
    """
    state_path = out / WORK_DIR / "state.json"
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output_dir={out} is a file, not a directory")
    if overwrite:
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        stages.write_json(state_path, {"fingerprint": fp, "payload": payload})
        return "fresh"
    recorded: dict[str, Any] | None = None
    what = ""
    if (out / "manifest.json").is_file():
        try:
            manifest = read_manifest(out)
        except ShardFormatError as error:
            raise PipelineError(f"{error}; rerun with overwrite=true to rebuild") from error
        recorded = {"fingerprint": manifest.fingerprint, "payload": manifest.config}
        what = "a finished build"
    elif state_path.is_file():
        what = "an unfinished build"
        try:  # written atomically: unreadable means damaged from outside
            recorded = stages.read_json(state_path)
            if not isinstance(recorded, dict) or "fingerprint" not in recorded:
                raise ValueError("not a build state")
        except ValueError as error:  # JSON and UTF-8 errors included
            raise PipelineError(
                f"{state_path}: unreadable ({error}); rerun with overwrite=true to rebuild"
            ) from error
    elif (out / "shards").is_dir() and any((out / "shards").iterdir()):
        raise PipelineError(
            f"{out}/shards holds files but {out} has no manifest.json or {WORK_DIR}: not a "
            "kiln data directory. Choose another output_dir, or set overwrite=true to "
            "replace shards/"
        )
    if recorded is not None and recorded["fingerprint"] != fp:
        raise PipelineError(
            f"output_dir={out} holds {what} made with another config or other inputs "
            f"({describe_changes(recorded.get('payload', {}), payload)}). Use another "
            "output_dir, or set overwrite=true to delete those outputs and rebuild"
        )
    if recorded is not None and what == "a finished build":
        _check_finished(out)
        return "complete"
    out.mkdir(parents=True, exist_ok=True)
    stages.write_json(state_path, {"fingerprint": fp, "payload": payload})
    return "resume" if recorded is not None else "fresh"


def _check_finished(out: Path) -> None:
    manifest = read_manifest(out)
    try:
        for record in manifest.shards:
            verify_shard(out, record)
        tokenizer = out / manifest.tokenizer.path
        if not tokenizer.is_file() or sha256_file(tokenizer) != manifest.tokenizer.sha256:
            raise ShardFormatError(f"{tokenizer}: missing or changed since the build")
    except ShardFormatError as error:
        raise PipelineError(
            f"{error}. The finished build in {out} is damaged; rerun with overwrite=true"
        ) from error


# --------------------------------------------------------------------------------------------
# Ray


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[tuple[int, int]]:
    """Connect to Ray (or start a local Ray for this run).

    Yields:
        (workers, in_flight): the tasks that may run at once, and the tasks to keep submitted.
        When the workers are all of the cluster's CPUs, Ray itself caps how many run, so a
        queue of twice as many keeps every worker fed while the driver handles a result;
        when `ray.workers` asks for fewer than the CPUs, exactly that many are submitted.
    """
    if cfg.address is None:
        # A local Ray for one run stays on the loopback interface (Ray otherwise advertises the
        # machine's outward address). Read by Ray at import, so set before importing it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local, loopback-only Ray keeps token authentication on; its notice is not news.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    import ray

    # a SIGTERM stops the driver as Ctrl-C does (Ray's own handler aborts with a stack dump);
    # set before Ray starts, so that one during its start-up stops it the same way
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_signal)
    started = False
    try:
        if not ray.is_initialized():
            started = True  # from here on, whatever ray.init started is shut down below
            # ray.init installs Ray's own SIGTERM handler (an exit, with a stack dump): held
            # back while it starts, and answered by ours once it is back in place
            held = previous is not None and hasattr(signal, "pthread_sigmask")
            if held:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                _start_ray(ray, cfg)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, _stop_on_signal)
                if held:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(cfg.workers or cpus, cpus)
        yield workers, (workers if workers < cpus else 2 * workers)
    finally:
        if started:
            ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_ray(ray: Any, cfg: RayConfig) -> None:
    """`ray.init` for a run: a local Ray of `ray.num_cpus`, or the cluster at `ray.address`."""
    options: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        # glibc gives each thread of a Ray worker its own malloc arena, and the arenas
        # fragment task after task: peak memory then grows with the number of units a
        # worker has run, i.e. with the corpus. Two arenas keep it flat (bench/).
        "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}},
    }
    if cfg.address is None:
        options |= {"address": "local", "num_cpus": cfg.num_cpus, "include_dashboard": False}
    else:
        from data_pipeline.ray_address import unreachable

        problem = unreachable(cfg.address)
        if problem:
            raise PipelineError(f"cannot join Ray at ray.address={cfg.address}: {problem}")
        options["address"] = cfg.address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise PipelineError(
            f"cannot start or join Ray (ray.address={cfg.address}): {error}"
        ) from error


class Stopped(KeyboardInterrupt):
    """The driver got SIGTERM; the build stops where it is (finished units are kept). A
    KeyboardInterrupt, as Ray's calls that wait (`ray.wait`, `ray.get`) let that one through
    their signal checks; another exception raised there came out as a SystemError."""


def _stop_on_signal(signum: int, _frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def run_tasks(
    function: Callable[..., Any],
    calls: Iterable[tuple[str, tuple[Any, ...]]],
    limit: int,
    on_result: Callable[[str, Any], None],
    stage: str,
) -> None:
    """Run `function(*args)` as Ray tasks, at most `limit` submitted at a time; call `on_result` on the
    driver as each finishes (in completion order: results are stored by key, never by order)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(function)
    pending: dict[Any, str] = {}
    queue = iter(calls)
    exhausted = False
    while True:
        while not exhausted and len(pending) < limit:
            item = next(queue, None)
            if item is None:
                exhausted = True
                break
            key, args = item
            pending[remote.remote(*args)] = key
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:
                for other in pending:
                    ray.cancel(other, force=True)
                from data_pipeline.tokenizer import TokenizerError

                # settings the data cannot meet: their one line, not the task's traceback
                if isinstance(getattr(error, "cause", None), TokenizerError):
                    raise PipelineError(f"{stage}: {error.cause}") from error
                raise PipelineError(f"{stage} failed on {key}:\n{error}") from error
            on_result(key, result)


def _progress(total: int, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs (each stage also prints one line)
    return tqdm(total=total, desc=f"{desc:<9}", unit=unit, disable=None, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class StageTiming:
    seconds: float = 0.0
    done: int = 0  # units (or shards) processed in this run
    resumed: int = 0  # units found finished by an earlier run
    task_seconds: float = 0.0  # summed worker time of the tasks run now
    peak_rss_mib: float = 0.0  # largest peak RSS reported by this stage's worker processes
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Build:
    """What one `kiln data` run knows; the report is made from it."""

    cfg: KilnConfig
    out: Path
    plans: list[SourcePlan]
    fingerprint: str
    workers: int = 1
    in_flight: int = 1  # tasks kept submitted (see ray_session)
    scans: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    tokenizer: TokenizerRecord | None = None
    timings: dict[str, StageTiming] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def work(self) -> Path:
        return self.out / WORK_DIR

    @property
    def units(self) -> list[WorkUnit]:
        return [unit for plan in self.plans for unit in plan.units]

    def refs(self) -> list[stages.UnitRef]:
        return [
            stages.UnitRef(unit.unit_id, plan.name, position, unit.index)
            for position, plan in enumerate(self.plans)
            for unit in plan.units
        ]

    def note_rss(self, marker: dict[str, Any], timing: StageTiming) -> None:
        rss = float(marker.get("peak_rss_mib", 0.0))
        self.peak_rss_mib = max(self.peak_rss_mib, rss)
        timing.peak_rss_mib = max(timing.peak_rss_mib, rss)


def run(cfg: KilnConfig) -> int:
    """`kiln data` entry point: returns the exit code; prints the reason on failure."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_signal)  # the whole build, not only Ray's part
    try:
        build_outputs(cfg)
    except PipelineError as error:
        print(f"kiln data: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemError) as error:
        stop = error if isinstance(error, KeyboardInterrupt) else _stop_behind(error)
        if stop is None:
            raise
        # stopped at once; every unit finished so far is kept in OUT/.work: one line, not the
        # traceback of wherever the driver was waiting
        what = str(stop) if isinstance(stop, Stopped) else "Ctrl-C"
        print(f"kiln data: stopped by {what}; the units finished so far are kept: rerun the "
              "same command to resume", file=sys.stderr)  # fmt: skip
        return 143 if isinstance(stop, Stopped) else 130
    return 0


def _stop_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM a SystemError of Ray's wraps (raised in a call of its that was
    waiting when the signal came), or None."""
    seen = error.__cause__ or error.__context__
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__cause__ or seen.__context__
    return seen


def build_outputs(cfg: KilnConfig) -> Manifest:
    """Run the whole pipeline into `cfg.output_dir` (resuming an interrupted run)."""
    out = Path(cfg.output_dir).expanduser().absolute()
    plans = plan_sources(cfg)
    payload = fingerprint_payload(cfg, plans)
    fp = fingerprint(payload)
    state = prepare_output(out, payload, fp, cfg.overwrite)
    if state == "complete":
        manifest = read_manifest(out)
        _cleanup(out, manifest)
        _say(f"{out} is up to date (fingerprint {fp[:12]}); nothing to do")
        return manifest
    build = Build(cfg, out, plans, fp)
    n_units = len(build.units)
    _say(
        f"{'resuming' if state == 'resume' else 'building'} {out}: "
        f"{len(plans)} source(s), {sum(p.files for p in plans)} files, "
        f"{sum(p.bytes for p in plans) / 1e6:.1f} MB in {n_units} units"
    )
    with ray_session(cfg.ray) as (workers, in_flight):
        build.workers, build.in_flight = workers, in_flight
        scan(build)
        check_errors(build)
        select(build)
        train_or_reuse_tokenizer(build)
        tokenize(build)
        shard(build)
    manifest = Manifest(
        fingerprint=fp,
        tokenizer=build.tokenizer,
        shards=build.shards,
        weights={plan.name: plan.weight for plan in plans},
        config=payload,
    )
    check_sources_nonempty(build, manifest)
    # the manifest marks the build complete, so it comes last: a process killed between the two
    # writes leaves a build that resumes (and writes both), not one whose report is gone
    report = make_report(build, manifest, status="ok")
    stages.write_json(out / "report.json", report)
    write_manifest(out, manifest)
    _cleanup(out, manifest)
    print_summary(report)
    return manifest


def _say(message: str) -> None:
    print(f"kiln data: {message}", file=sys.stderr, flush=True)


def _finished(build: Build, stage: str) -> StageTiming:
    return build.timings.setdefault(stage, StageTiming())


# -- scan


def scan(build: Build) -> None:
    cfg = build.cfg
    settings = stages.ScanSettings(cfg.normalize, cfg.filters, cfg.dedup, cfg.corpus.max_doc_bytes)
    timing = _finished(build, "scan")
    start = time.perf_counter()
    todo = []
    for unit in build.units:
        marker = build.work / "scan" / f"{unit.unit_id}.json"
        if marker.is_file():
            build.scans[unit.unit_id] = stages.read_json(marker)
            timing.resumed += 1
        else:
            todo.append((unit.unit_id, (unit, settings, build.work)))
    bar = _progress(len(build.units), "scan", "unit")
    bar.update(timing.resumed)

    def done(unit_id: str, marker: dict[str, Any]) -> None:
        build.scans[unit_id] = marker
        build.note_rss(marker, timing)
        timing.done += 1
        timing.task_seconds += marker["seconds"]
        timing.extra["bytes"] = timing.extra.get("bytes", 0) + marker["bytes_in"]
        bar.update(1)
        bar.set_postfix(kept=sum(m["kept"] for m in build.scans.values()), refresh=False)

    run_tasks(stages.scan_unit, todo, build.in_flight, done, "scan")
    bar.close()
    timing.seconds = time.perf_counter() - start
    kept = sum(m["kept"] for m in build.scans.values())
    read = sum(m["skips"]["counts"].get(DOCUMENTS_READ, 0) for m in build.scans.values())
    _say(
        f"scan: {len(build.units)} units ({timing.resumed} done before), {read} documents "
        f"read, {kept} kept after filters, {timing.seconds:.1f} s"
    )


def check_errors(build: Build) -> None:
    """Fail, naming the worst file, when a source has more bad input than allowed.

    Bad input is every skip reason but `empty`: an empty file (such as an `__init__.py`) or
    record is skipped and counted, but it is not damaged data.
    """
    limit = build.cfg.max_error_fraction
    for plan in build.plans:
        counts: dict[str, int] = {}
        per_file: dict[str, dict[str, int]] = {}
        for unit in plan.units:
            skips = build.scans[unit.unit_id]["skips"]
            for reason, n in skips["counts"].items():
                counts[reason] = counts.get(reason, 0) + n
            for path, file_counts in skips["per_file"].items():
                merged = per_file.setdefault(path, {})
                for reason, n in file_counts.items():
                    merged[reason] = merged.get(reason, 0) + n
        bad = sum(n for reason, n in counts.items() if reason in ERROR_REASONS)
        total = counts.get(DOCUMENTS_READ, 0) + sum(
            n for reason, n in counts.items() if reason in SKIP_REASONS
        )
        if total and bad / total > limit:
            errors = {
                path: sum(n for r, n in file_counts.items() if r in ERROR_REASONS)
                for path, file_counts in sorted(per_file.items())
            }
            worst = max(errors, key=errors.__getitem__)
            reasons = ", ".join(
                f"{r} {n}" for r, n in sorted(per_file[worst].items()) if r in ERROR_REASONS
            )
            message = (
                f"source {plan.name!r}: {bad} of {total} documents ({bad / total:.1%}) are bad "
                f"input, over max_error_fraction={limit}. Worst file: {worst} ({reasons}). "
                f"Counts per file are in {build.out / 'report.json'}; fix the input or raise "
                "max_error_fraction (finished work is kept for the rerun)"
            )
            stages.write_json(
                build.out / "report.json", make_report(build, None, "failed", message)
            )
            raise PipelineError(message)


# -- select


def select(build: Build) -> None:
    cfg = build.cfg
    timing = _finished(build, "select")
    start = time.perf_counter()
    path = build.work / "select.json"
    if path.is_file():
        build.selection = stages.read_json(path)
        timing.resumed = 1
    else:
        settings = stages.SelectSettings(
            dedup=cfg.dedup,
            val_fraction=cfg.split.val_fraction,
            sample_bytes=0 if cfg.tokenizer.path else cfg.tokenizer.sample_bytes,
            weights={plan.name: plan.weight for plan in build.plans},
        )

        def done(_: str, result: dict[str, Any]) -> None:
            build.selection = result
            build.note_rss(result, timing)
            timing.task_seconds += result["seconds"]

        run_tasks(
            stages.select, [("corpus", (build.refs(), settings, build.work))], 1, done, "dedup"
        )
        timing.done = 1
    timing.seconds = time.perf_counter() - start
    sources = build.selection["sources"]
    exact = sum(s["exact_duplicates"] for s in sources.values())
    near = sum(s["near_duplicates"] for s in sources.values())
    _say(f"dedup: {exact} exact and {near} near duplicates removed, {timing.seconds:.1f} s")


# -- tokenizer


def train_tokenizer_task(texts: list[str], tokenizer_cfg: Any, path: Path) -> dict[str, Any]:
    from data_pipeline.tokenizer import train_tokenizer

    start = time.perf_counter()
    info = train_tokenizer(texts, tokenizer_cfg, path, threads=tokenizer_cfg.num_threads)
    return {
        "info": asdict(info),
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": stages.peak_rss_mib(),
    }


def train_or_reuse_tokenizer(build: Build) -> None:
    from data_pipeline.tokenizer import load_tokenizer_info

    cfg = build.cfg
    timing = _finished(build, "tokenizer")
    start = time.perf_counter()
    target = build.out / TOKENIZER_FILE
    marker = build.work / "tokenizer.json"
    if cfg.tokenizer.path is not None:
        source = Path(cfg.tokenizer.path).expanduser()
        if not target.is_file() or sha256_file(target) != sha256_file(source):
            atomic_write_bytes(target, source.read_bytes())
        origin = f"reused {source}"
    elif (
        marker.is_file()
        and target.is_file()
        and sha256_file(target) == stages.read_json(marker)["sha256"]
    ):
        timing.resumed = 1
        origin = "trained by an earlier run"
    else:
        samples: dict[str, list[str]] = {}
        calls = [
            (
                ref.unit_id,
                (build.work, ref.unit_id, build.selection["units"][ref.unit_id]["sample"]),
            )
            for ref in build.refs()
            if build.selection["units"][ref.unit_id]["sample"]
        ]
        run_tasks(
            stages.gather_sample, calls, build.in_flight, samples.__setitem__, "tokenizer sample"
        )
        texts = [text for ref in build.refs() for text in samples.get(ref.unit_id, [])]
        if not texts:
            raise PipelineError("no documents left to train the tokenizer on (see report.json)")
        results: dict[str, Any] = {}
        run_tasks(
            train_tokenizer_task,
            [("tokenizer", (texts, cfg.tokenizer, target))],
            1,
            results.__setitem__,
            "tokenizer training",
        )
        result = results["tokenizer"]
        build.note_rss(result, timing)
        timing.task_seconds = result["seconds"]
        timing.extra["sample_bytes"] = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        timing.extra["sample_documents"] = len(texts)
        timing.done = 1
        stages.write_json(marker, {"sha256": result["info"]["sha256"]})
        origin = f"trained on {len(texts)} documents ({timing.extra['sample_bytes'] / 1e6:.1f} MB)"
    try:
        info = load_tokenizer_info(target)
    except ValueError as error:
        raise PipelineError(f"{error} (kiln needs pad, unk, bos, eos and <mask>)") from error
    build.tokenizer = TokenizerRecord(
        path=TOKENIZER_FILE,
        sha256=info.sha256,
        vocab_size=info.vocab_size,
        model_type=info.model_type,
        special_ids=info.special_ids,
        sentinel_ids=info.sentinel_ids,
    )
    timing.seconds = time.perf_counter() - start
    _say(
        f"tokenizer: {info.model_type}, {info.vocab_size} pieces, {origin}, {timing.seconds:.1f} s"
    )


# -- tokenize


def tokenize(build: Build) -> None:
    assert build.tokenizer is not None
    timing = _finished(build, "tokenize")
    start = time.perf_counter()
    target = str(build.out / TOKENIZER_FILE)
    todo = []
    for ref in build.refs():
        marker = build.work / "tokens" / f"{ref.unit_id}.json"
        if marker.is_file():
            build.tokens[ref.unit_id] = stages.read_json(marker)
            timing.resumed += 1
        else:
            selection = build.selection["units"][ref.unit_id]
            args = (
                build.work,
                ref.unit_id,
                ref.source,
                selection,
                target,
                build.tokenizer.sha256,
                build.tokenizer.vocab_size,
            )
            todo.append((ref.unit_id, args))
    total_docs = sum(m["kept"] for m in build.scans.values()) - sum(
        s["exact_duplicates"] + s["near_duplicates"] for s in build.selection["sources"].values()
    )
    bar = _progress(total_docs, "tokenize", "doc")
    bar.update(sum(sum(m["documents"].values()) for m in build.tokens.values()))

    def done(unit_id: str, marker: dict[str, Any]) -> None:
        build.tokens[unit_id] = marker
        build.note_rss(marker, timing)
        timing.done += 1
        timing.task_seconds += marker["seconds"]
        timing.extra["tokens"] = timing.extra.get("tokens", 0) + sum(marker["tokens"].values())
        bar.update(sum(marker["documents"].values()))
        bar.set_postfix(
            tokens=sum(sum(m["tokens"].values()) for m in build.tokens.values()), refresh=False
        )

    run_tasks(stages.tokenize_unit, todo, build.in_flight, done, "tokenize")
    bar.close()
    timing.seconds = time.perf_counter() - start
    tokens = sum(sum(m["tokens"].values()) for m in build.tokens.values())
    rate = timing.extra.get("tokens", 0) / timing.seconds if timing.seconds else 0.0
    _say(
        f"tokenize: {tokens} tokens ({rate / 1e6:.2f} M tokens/s this run), {timing.seconds:.1f} s"
    )


# -- shard


def shard(build: Build) -> None:
    assert build.tokenizer is not None
    cfg = build.cfg
    timing = _finished(build, "shard")
    start = time.perf_counter()
    vocab = build.tokenizer.vocab_size
    specs = stages.plan_shards(
        build.work,
        build.refs(),
        [p.name for p in build.plans],
        cfg.shards.target_bytes,
        vocab,
        shuffle_shards=cfg.shards.shuffle_shards,
        seed=cfg.shards.seed,
    )
    records: dict[str, ShardRecord] = {}
    todo = []
    for spec in specs:
        record = stages.shard_done(build.out, build.work, spec)
        if record is not None:
            records[spec.name] = record
            timing.resumed += 1
        else:
            todo.append((spec.name, (build.out, build.work, spec, vocab, cfg.shards.block_tokens)))
    bar = _progress(len(specs), "shard", "shard")
    bar.update(timing.resumed)

    def done(name: str, marker: dict[str, Any]) -> None:
        records[name] = ShardRecord(**marker["record"])
        build.note_rss(marker, timing)
        timing.done += 1
        timing.task_seconds += marker["seconds"]
        timing.extra["bytes"] = timing.extra.get("bytes", 0) + marker["record"]["bytes"]
        bar.update(1)

    run_tasks(stages.write_shard_spec, todo, build.in_flight, done, "shard")
    bar.close()
    build.shards = [records[spec.name] for spec in specs]
    timing.seconds = time.perf_counter() - start
    size = sum(r.bytes for r in build.shards)
    _say(f"shard: {len(specs)} shards, {size / 1e6:.1f} MB, {timing.seconds:.1f} s")


def check_sources_nonempty(build: Build, manifest: Manifest) -> None:
    totals = manifest.totals()
    empty = [
        plan.name
        for plan in build.plans
        if totals.get(plan.name, {}).get("train", {}).get("tokens", 0) == 0
    ]
    if empty:
        message = (
            f"source(s) {', '.join(empty)} have no training tokens left after reading, filters "
            "and dedup; a mixture cannot draw from them. See report.json for where documents went"
        )
        stages.write_json(
            build.out / "report.json", make_report(build, manifest, "failed", message)
        )
        raise PipelineError(message)


def _cleanup(out: Path, manifest: Manifest) -> None:
    """Remove the work directory and anything in shards/ the manifest does not list."""
    listed = {Path(record.path).name for record in manifest.shards}
    for path in (out / "shards").iterdir():
        if path.name not in listed:
            path.unlink()
    for path in out.glob(".*.tmp"):  # left by a run killed while writing the tokenizer
        path.unlink()
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# report


def make_report(
    build: Build, manifest: Manifest | None, status: str, message: str | None = None
) -> dict[str, Any]:
    """`report.json`: per source, where every document went; per stage, time and throughput."""
    totals = manifest.totals() if manifest else {}
    selection = build.selection.get("sources", {})
    all_tokens = sum(t.get("train", {}).get("tokens", 0) for t in totals.values())
    weight_sum = sum(plan.weight for plan in build.plans)
    sources: dict[str, Any] = {}
    worst_files: dict[str, dict[str, int]] = {}
    for plan in build.plans:
        counts: dict[str, int] = {}
        filtered: dict[str, int] = {}
        bytes_in = 0
        for unit in plan.units:
            scan_marker = build.scans.get(unit.unit_id)
            if scan_marker is None:
                continue
            bytes_in += scan_marker["bytes_in"]
            for reason, n in scan_marker["skips"]["counts"].items():
                counts[reason] = counts.get(reason, 0) + n
            for name, n in scan_marker["filtered"].items():
                filtered[name] = filtered.get(name, 0) + n
            for path, file_counts in scan_marker["skips"]["per_file"].items():
                bad = {r: n for r, n in file_counts.items() if r in SKIP_REASONS}
                if bad:  # a file cut into several units: its counts add up
                    merged = worst_files.setdefault(path, {})
                    for reason, n in bad.items():
                        merged[reason] = merged.get(reason, 0) + n
        skipped = {reason: counts.get(reason, 0) for reason in SKIP_REASONS}
        chosen = selection.get(plan.name, {})
        split_totals = totals.get(plan.name, {})
        train_tokens = split_totals.get("train", {}).get("tokens", 0)
        sources[plan.name] = {
            "weight": plan.weight,
            "target_share": plan.weight / weight_sum,
            "natural_share": train_tokens / all_tokens if all_tokens else 0.0,
            "files": plan.files,
            "units": len(plan.units),
            "bytes_in": bytes_in,
            "documents_in": counts.get(DOCUMENTS_READ, 0) + sum(skipped.values()),
            "documents_read": counts.get(DOCUMENTS_READ, 0),
            "skipped": skipped,
            "filtered": filtered,
            "exact_duplicates": chosen.get("exact_duplicates", 0),
            "near_duplicates": chosen.get("near_duplicates", 0),
            "tokenizer_sample_documents": chosen.get("sample_documents", 0),
            "tokenizer_sample_bytes": chosen.get("sample_bytes", 0),
            "documents_out": {s: split_totals.get(s, {}).get("documents", 0) for s in SPLITS},
            "tokens_out": {s: split_totals.get(s, {}).get("tokens", 0) for s in SPLITS},
            "shards": {s: split_totals.get(s, {}).get("shards", 0) for s in SPLITS},
        }
    stage_report = {}
    for name, timing in build.timings.items():
        entry: dict[str, Any] = {
            "seconds": round(timing.seconds, 3),
            "done": timing.done,
            "resumed": timing.resumed,
            "task_seconds": round(timing.task_seconds, 3),
            "peak_rss_mib": round(timing.peak_rss_mib, 1),
        }
        entry |= {key: value for key, value in timing.extra.items()}
        if timing.seconds > 0:
            if "bytes" in timing.extra:
                entry["mb_per_s"] = round(timing.extra["bytes"] / 1e6 / timing.seconds, 3)
            if "tokens" in timing.extra:
                entry["tokens_per_s"] = round(timing.extra["tokens"] / timing.seconds, 1)
        stage_report[name] = entry
    report: dict[str, Any] = {
        "status": status,
        "output_dir": str(build.out),
        "fingerprint": build.fingerprint,
        "workers": build.workers,
        "wall_seconds": round(time.perf_counter() - build.started, 3),
        "worker_peak_rss_mib": round(build.peak_rss_mib, 1),
        "sources": sources,
        "stages": stage_report,
        "bad_input_files": dict(sorted(worst_files.items())),
    }
    if build.tokenizer is not None:
        report["tokenizer"] = asdict(build.tokenizer)
    if message:
        report["message"] = message
    return report


def print_summary(report: dict[str, Any]) -> None:
    """The final table: where each source's documents went, tokens and shards; stage times."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for every column
        console.width = 160
    columns = (
        "source",
        "weight",
        "docs in",
        "empty",
        "bad",
        "filtered",
        "exact dup",
        "near dup",
        "docs out",
        "train tokens",
        "val tokens",
        "shards",
        "token share",
    )
    rows = [
        (
            name,
            f"{s['weight']:g}",
            f"{s['documents_in']:,}",
            f"{s['skipped'].get('empty', 0):,}",
            f"{sum(s['skipped'].get(reason, 0) for reason in ERROR_REASONS):,}",
            f"{sum(s['filtered'].values()):,}",
            f"{s['exact_duplicates']:,}",
            f"{s['near_duplicates']:,}",
            f"{sum(s['documents_out'].values()):,}",
            f"{s['tokens_out']['train']:,}",
            f"{s['tokens_out']['val']:,}",
            f"{sum(s['shards'].values())}",
            f"{s['natural_share']:.1%} (target {s['target_share']:.0%})",
        )
        for name, s in report["sources"].items()
    ]
    table = Table(title=f"kiln data: {report['output_dir']}", title_justify="left")
    if console.width >= 150:  # a row per source
        for column in columns:
            table.add_column(column, justify="left" if column == "source" else "right")
        for row in rows:
            table.add_row(*row)
    else:  # a narrow terminal: a column per source, so no number is cut
        for column, *cells in zip(columns, *rows, strict=True):
            if not table.columns:
                table.add_column(column)
                for cell in cells:
                    table.add_column(cell, justify="right")
            else:
                table.add_row(column, *cells)
    console.print(table)
    stages_table = Table(title="stages", title_justify="left")
    for column in ("stage", "seconds", "units run", "resumed", "throughput"):
        stages_table.add_column(column, justify="left" if column == "stage" else "right")
    for name, s in report["stages"].items():
        rate = ""
        if "tokens_per_s" in s:
            rate = f"{s['tokens_per_s'] / 1e6:.2f} M tokens/s"
        elif "mb_per_s" in s:
            rate = f"{s['mb_per_s']:.1f} MB/s"
        stages_table.add_row(name, f"{s['seconds']:.1f}", str(s["done"]), str(s["resumed"]), rate)
    console.print(stages_table)
    console.print(
        f"workers: {report['workers']}, worker peak memory {report['worker_peak_rss_mib']:.0f} MiB,"
        f" wall {report['wall_seconds']:.1f} s; details in {report['output_dir']}/report.json"
    )
