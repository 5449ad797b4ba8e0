"""`kiln data` end to end on a real Ray cluster: determinism across worker counts, resume after
SIGKILL, bad input, dedup, mixture accounting, interop with webdataset and Ray Data."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hydra import compose, initialize_config_module
from services import RayHead

from data_pipeline.filters import normalize
from data_pipeline.pipeline import PipelineError, build_outputs, prepare_output, print_summary
from data_pipeline.shards import (
    SPLITS,
    ShardFormatError,
    iter_blocks,
    iter_documents,
    read_manifest,
)
from data_pipeline.tokenizer import load_processor, load_tokenizer_info
from pretrain.config import KilnConfig, NormalizeConfig, build_config, register_configs

pytestmark = pytest.mark.ray

KILN = Path(sys.executable).parent / "kiln"
# Vocabulary of the generated prose: random words from it make documents that pass the quality
# filters and share no 5-word shingles by chance.
WORDS = [
    "river",
    "stone",
    "lantern",
    "meadow",
    "copper",
    "whisper",
    "harbor",
    "velvet",
    "signal",
    "orchard",
    "thunder",
    "pebble",
    "canvas",
    "ember",
    "glacier",
    "saddle",
    "compass",
    "marble",
    "violet",
    "falcon",
    "timber",
    "ribbon",
    "quartz",
    "willow",
    "beacon",
    "cinder",
    "hollow",
    "jasmine",
    "kettle",
    "lumber",
    "mosaic",
    "nectar",
    "oyster",
    "parcel",
    "quiver",
    "rustle",
    "sparrow",
    "tundra",
    "umbra",
    "vessel",
    "walnut",
    "yonder",
    "zephyr",
    "anchor",
    "bramble",
    "citadel",
    "dune",
    "fable",
    "garnet",
    "heron",
    "island",
    "jungle",
    "kernel",
    "lagoon",
    "mantle",
    "nomad",
    "opal",
    "prism",
    "quill",
    "raven",
    "summit",
    "tapestry",
    "utopia",
    "valley",
    "wander",
    "yarrow",
    "zenith",
    "amber",
    "basalt",
    "cobalt",
    "delta",
    "eclipse",
    "fjord",
]
N_PROSE = 60
EXACT_COPIES = (3, 17, 17, 40)  # copied verbatim or with other whitespace (17 twice)
NEAR_COPIES = (5, 22, 51)  # copied with one word changed


def prose(rng: random.Random, n_words: int) -> str:
    lines = []
    for start in range(0, n_words, 12):
        words = [rng.choice(WORDS) for _ in range(min(12, n_words - start))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


def write_prose_corpus(directory: Path) -> dict[str, list[str]]:
    """Two jsonl files (one gzipped) of distinct documents with planted exact and near copies.

    Returns the normalized texts that must survive (in global order) and those that must not.
    """
    rng = random.Random(7)
    originals = [prose(rng, rng.randint(150, 400)) for _ in range(N_PROSE)]
    records = [{"text": text, "n": i} for i, text in enumerate(originals)]
    copies = []
    for k, index in enumerate(EXACT_COPIES):
        text = originals[index]
        if k % 2:  # the same text after normalisation: CRLF line ends, trailing spaces
            text = text.replace("\n", "  \r\n") + "\n\n"
        copies.append({"text": text, "copy": index})
    for index in NEAR_COPIES:
        words = originals[index].split(" ")
        words[len(words) // 2] = "CHANGED"
        copies.append({"text": " ".join(words), "near": index})
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "a.jsonl", "w") as handle:
        for record in records[:40]:
            handle.write(json.dumps(record) + "\n")
    with gzip.open(directory / "b.jsonl.gz", "wt") as handle:
        for record in records[40:] + copies:
            handle.write(json.dumps(record) + "\n")
    cfg = NormalizeConfig()
    return {"survivors": [normalize(t, cfg) for t in originals]}


@pytest.fixture(scope="module")
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    directory = tmp_path_factory.mktemp("prose")
    return directory, write_prose_corpus(directory)


def mix_overrides(corpus_dir: Path) -> list[str]:
    """Library code from two stdlib packages (weight 0.75) and the generated prose (0.25)."""
    return [
        "corpus=stdlib_mix",
        "corpus.sources.0.paths=[stdlib/json,stdlib/email]",
        "corpus.sources.1.name=prose",
        f"corpus.sources.1.paths=[{corpus_dir}/*.jsonl*]",
        "corpus.sources.1.format=auto",
        "tokenizer.vocab_size=800",
        "tokenizer.n_sentinels=20",
        "shards.target_bytes=65536",
        "shards.block_tokens=4096",
        "shards.min_unit_bytes=65536",  # several units per source, so a kill lands mid-stage
        "split.val_fraction=0.05",
    ]


def make_config(hydra_context: None, overrides: list[str]) -> KilnConfig:
    return build_config(compose("data", overrides=overrides))


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file `kiln data` leaves, but report.json (it holds timings)."""
    files = [out / "manifest.json", out / "tokenizer.model", *sorted((out / "shards").iterdir())]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def kiln_data(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KILN), "data", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def reference(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, tmp_path_factory
) -> Path:
    """The mix corpus built once, uninterrupted, with 2 workers."""
    out = tmp_path_factory.mktemp("reference")
    overrides = mix_overrides(corpus[0]) + [
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        "ray.workers=2",
    ]
    build_outputs(make_config(hydra_context, overrides))
    return out


# --------------------------------------------------------------------------------------------


def test_default_run_builds_everything_from_the_standard_library(tmp_path: Path) -> None:
    """The issue's first "must show": `kiln data output_dir=OUT` and nothing else, on a Ray
    started for the run."""
    result = kiln_data(f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    manifest = read_manifest(out)
    assert manifest.weights == {"stdlib": 1.0}
    assert {s.split for s in manifest.shards} == {"train", "val"}
    assert all((out / s.path).is_file() for s in manifest.shards)
    assert not (out / ".work").exists() and not list(out.glob(".*.tmp"))
    info = load_tokenizer_info(out / "tokenizer.model")
    assert info.vocab_size == 4096 and info.model_type == "bpe"
    assert info.special_ids == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    assert info.sentinel_ids == list(range(5, 105))
    assert manifest.tokenizer.sha256 == info.sha256
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    stdlib = report["sources"]["stdlib"]
    assert stdlib["documents_in"] > 500  # hundreds of stdlib modules
    assert sum(stdlib["tokens_out"].values()) == sum(s.tokens for s in manifest.shards)
    # the progress display: one line per stage, then the summary table
    for stage in ("scan:", "dedup:", "tokenizer:", "tokenize:", "shard:"):
        assert f"kiln data: {stage}" in result.stderr
    assert "train tokens" in result.stdout and f"{stdlib['tokens_out']['train']:,}" in result.stdout


def test_a_sweep_builds_each_point_in_its_own_output_directory(tmp_path: Path) -> None:
    """`kiln data -m`: point N builds in OUTPUT_DIR/sweep-N (the points shared one directory,
    and the second refused the first's outputs as another config's)."""
    out = tmp_path / "out"
    result = kiln_data("-m", "corpus=stdlib", "corpus.sources.0.paths=[stdlib/json]",
                       f"output_dir={out}", "tokenizer.vocab_size=460,500", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["sweep-0", "sweep-1"]
    vocab = [load_tokenizer_info(out / f"sweep-{n}" / "tokenizer.model").vocab_size for n in (0, 1)]
    assert vocab == [460, 500]


def test_same_outputs_with_one_and_two_workers(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path, tmp_path
) -> None:
    out = tmp_path / "one"
    overrides = mix_overrides(corpus[0]) + [
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        "ray.workers=1",
    ]
    build_outputs(make_config(hydra_context, overrides))
    assert json.loads((out / "report.json").read_text())["workers"] == 1
    assert json.loads((reference / "report.json").read_text())["workers"] == 2
    assert output_hashes(out) == output_hashes(reference)
    assert len(output_hashes(out)) > 6  # several shards per source and split


def test_planted_duplicates_removed_and_tokens_round_trip(
    reference: Path, corpus: tuple[Path, dict]
) -> None:
    report = json.loads((reference / "report.json").read_text())
    prose_report = report["sources"]["prose"]
    assert prose_report["exact_duplicates"] == len(EXACT_COPIES)
    assert prose_report["near_duplicates"] == len(NEAR_COPIES)
    assert prose_report["documents_read"] == N_PROSE + len(EXACT_COPIES) + len(NEAR_COPIES)
    manifest = read_manifest(reference)
    processor = load_processor(reference / "tokenizer.model")
    survivors = corpus[1]["survivors"]
    decoded: dict[str, list[str]] = {}
    for record in manifest.shards:
        if record.source != "prose":
            continue
        for tokens in iter_documents(reference / record.path):
            text = processor.decode(tokens.tolist())
            assert tokens.tolist() == processor.encode(text)  # exactly the tokens that went in
            decoded.setdefault(record.split, []).append(text)
    # every distinct document survives exactly once, shuffled (shards.shuffle_shards)
    assert sorted(decoded["train"] + decoded["val"]) == sorted(survivors)
    positions = [survivors.index(text) for text in decoded["train"]]
    assert positions != sorted(positions)
    assert decoded["val"], "split.val_fraction=0.05 holds documents out"


def test_mixture_accounting_matches_manifest_and_shards(reference: Path) -> None:
    manifest = read_manifest(reference)
    report = json.loads((reference / "report.json").read_text())
    assert manifest.weights == {"library": 0.75, "prose": 0.25}
    totals = manifest.totals()
    read_back: dict[tuple[str, str], list[int]] = {}
    for record in manifest.shards:
        tokens = documents = 0
        for _, block, lengths in iter_blocks(reference / record.path):
            assert block.dtype == np.uint16 and lengths.dtype == np.uint32
            tokens += block.size
            documents += lengths.size
        assert (tokens, documents) == (record.tokens, record.documents)
        entry = read_back.setdefault((record.source, record.split), [0, 0])
        entry[0] += tokens
        entry[1] += documents
    for source in ("library", "prose"):
        for split in SPLITS:
            tokens, documents = read_back[(source, split)]
            assert totals[source][split]["tokens"] == tokens > 0
            assert totals[source][split]["documents"] == documents > 0
            assert report["sources"][source]["tokens_out"][split] == tokens
            assert report["sources"][source]["documents_out"][split] == documents
    shares = {s: report["sources"][s]["natural_share"] for s in ("library", "prose")}
    assert sum(shares.values()) == pytest.approx(1.0)
    # the tokenizer sample is drawn by weight and bounded by tokenizer.sample_bytes
    budget = json.loads((reference / "manifest.json").read_text())["config"]["tokenizer"]
    for source, weight in manifest.weights.items():
        sampled = report["sources"][source]["tokenizer_sample_bytes"]
        assert 0 < sampled <= budget["sample_bytes"] * weight


def test_interop_with_webdataset_and_ray_data(reference: Path, ray_head: RayHead) -> None:
    import ray
    import webdataset as wds

    manifest = read_manifest(reference)
    expected = {
        key: tokens
        for record in manifest.shards
        for key, tokens, _ in iter_blocks(reference / record.path)
    }
    urls = [str(reference / record.path) for record in manifest.shards]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        seen[sample["__key__"]] = sample["tokens.npy"]
        assert int(sample["lengths.npy"].sum()) == sample["tokens.npy"].size
    assert seen.keys() == expected.keys()
    assert all(np.array_equal(seen[key], expected[key]) for key in expected)

    ray.init(address=ray_head.address, logging_level="WARNING")
    try:
        rows = ray.data.read_webdataset(urls).take_all()
    finally:
        ray.shutdown()
    from_ray = {row["__key__"]: np.asarray(row["tokens.npy"]) for row in rows}
    assert from_ray.keys() == expected.keys()
    assert all(np.array_equal(from_ray[key], expected[key]) for key in expected)


@pytest.mark.parametrize("kill_after", ["scan", "tokenizer"])
def test_resume_after_sigkill_gives_identical_outputs(
    kill_after: str, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path, tmp_path
) -> None:
    out = tmp_path / "out"
    args = mix_overrides(corpus[0]) + [
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        "ray.workers=1",  # slower, so the kill lands mid-stage
    ]
    marker = {"scan": lambda: len(list((out / ".work/scan").glob("*.json"))) >= 2,
              "tokenizer": lambda: (out / ".work/tokenizer.json").is_file()}[kill_after]  # fmt: skip
    process = subprocess.Popen(
        [str(KILN), "data", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while not marker() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    result = kiln_data(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["scan"]["resumed"] >= 2
    if kill_after == "tokenizer":
        assert stages["scan"]["done"] == 0 and stages["tokenizer"]["resumed"] == 1
    assert output_hashes(out) == output_hashes(reference)


@pytest.mark.parametrize(("sig", "to", "status", "ray"),
                         [(signal.SIGINT, "group", 130, "cluster"),
                          (signal.SIGTERM, "driver", 143, "cluster"),
                          (signal.SIGTERM, "driver", 143, "local")])  # fmt: skip
def test_a_stopped_build_says_so_in_one_line_and_resumes(
    sig: signal.Signals, to: str, status: int, ray: str, corpus: tuple[Path, dict],
    ray_head: RayHead, reference: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """Ctrl-C (SIGINT to the terminal's process group) or a SIGTERM to the driver stops the
    build at once with one line, not a traceback or Ray's abort; the rerun resumes. With a
    Ray of the build's own (`ray.address` unset), nothing of it is left running."""
    out = tmp_path / "out"
    where = [f"ray.address={ray_head.address}"] if ray == "cluster" else ["ray.num_cpus=1"]
    args = mix_overrides(corpus[0]) + [f"output_dir={out}", *where, "ray.workers=1"]
    # as a terminal starts it: a pytest-xdist worker ignores SIGINT, and so would its child
    process = subprocess.Popen([str(KILN), "data", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 300
    while (
        len(list((out / ".work/scan").glob("*.json"))) < 2
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be stopped"
    if to == "group":
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-3000:]
    assert f"kiln data: stopped by {'Ctrl-C' if to == 'group' else sig.name}; the units " in stderr
    assert "Traceback" not in stderr and "***" not in stderr, stderr[-3000:]
    if ray == "local":  # its raylet, GCS and agents (they outlived the driver before)
        time.sleep(3)
        left = subprocess.run(["pgrep", "-a", "-s", str(process.pid)], capture_output=True,
                              text=True).stdout  # fmt: skip
        assert left == "", left
    result = kiln_data(*args, cwd=tmp_path)
    assert result.returncode == 0 and "resuming" in result.stderr, result.stderr[-3000:]
    assert output_hashes(out) == output_hashes(reference)


def test_a_build_stopped_at_its_last_write_resumes_with_its_report(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The manifest marks a build complete: a process stopped as it writes it (the last write)
    has its report.json, and the rerun resumes and writes both."""
    import data_pipeline.pipeline as pipeline

    out = tmp_path / "out"
    overrides = mix_overrides(corpus[0]) + [f"output_dir={out}", f"ray.address={ray_head.address}"]

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_manifest", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_outputs(make_config(hydra_context, overrides))
    assert (out / "report.json").is_file() and not (out / "manifest.json").exists()
    monkeypatch.undo()
    build_outputs(make_config(hydra_context, overrides))
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["stages"]["shard"]["resumed"] > 0, report["stages"]
    assert output_hashes(out) == output_hashes(reference)
    assert not (out / ".work").exists()


def test_changed_config_is_refused_unless_overwrite(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path
) -> None:
    before = output_hashes(reference)
    base = mix_overrides(corpus[0]) + [f"output_dir={reference}", f"ray.address={ray_head.address}"]
    # the same config: up to date, nothing rebuilt
    build_outputs(make_config(hydra_context, base))
    assert output_hashes(reference) == before
    changed = base + ["tokenizer.vocab_size=900"]
    with pytest.raises(PipelineError, match=r"tokenizer\.vocab_size: 800 -> 900.*overwrite=true"):
        build_outputs(make_config(hydra_context, changed))
    assert output_hashes(reference) == before  # nothing was touched


def test_local_launch_of_a_data_job_records_a_command_that_reruns_it(
    corpus: tuple[Path, dict], ray_head: RayHead, reference: Path, tmp_path: Path
) -> None:
    """`kiln launch job=data cluster=local` runs the pipeline in its own process; command.txt's
    line runs the same pipeline on the same config (here: finds the build up to date)."""
    before = output_hashes(reference)
    args = ["job=data", "cluster=local", *mix_overrides(corpus[0]), f"output_dir={reference}",
            f"ray.address={ray_head.address}"]  # fmt: skip
    launched = subprocess.run([str(KILN), "launch", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    invoked, runs = (reference / "launch" / "command.txt").read_text().splitlines()[1::2]
    assert shlex.split(invoked) == ["kiln", "launch", *args]
    command = shlex.split(runs)
    config = reference / "launch" / "config.pkl"
    assert command[1:] == ["-m", "launch.slurm_task", "data", str(config)]
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "up to date" in rerun.stdout + rerun.stderr
    assert output_hashes(reference) == before


def test_a_damaged_build_state_is_named_and_overwrite_clears_it(tmp_path: Path) -> None:
    """OUT/.work/state.json (written atomically) damaged from outside: a one-line refusal that
    names it, and overwrite=true starts afresh instead of failing on it too."""
    state = tmp_path / ".work" / "state.json"
    state.parent.mkdir()
    state.write_text('{"fingerprint": "ab')  # cut short
    with pytest.raises(
        PipelineError, match=rf"{re.escape(str(state))}: unreadable .*overwrite=true"
    ):
        prepare_output(tmp_path, {}, "cd", overwrite=False)
    assert prepare_output(tmp_path, {"k": 1}, "cd", overwrite=True) == "fresh"
    assert json.loads(state.read_text()) == {"fingerprint": "cd", "payload": {"k": 1}}


def test_overwrite_always_starts_afresh(tmp_path: Path) -> None:
    """overwrite=true deletes kiln's outputs whatever they are, a build of this very config
    included (one damaged, or whose inputs changed unseen): it used to keep those, and say
    again that the build was damaged and needed overwrite=true."""
    state = tmp_path / ".work" / "state.json"
    prepare_output(tmp_path, {"k": 1}, "cd", overwrite=False)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "main-train-00000.tar").write_bytes(b"cut short")
    (tmp_path / "manifest.json").write_text("{}")  # a finished build, damaged
    assert prepare_output(tmp_path, {"k": 1}, "cd", overwrite=True) == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".work"]
    assert json.loads(state.read_text())["fingerprint"] == "cd"


def test_an_unfinished_build_and_a_file_for_output_dir_are_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(PipelineError, match=rf"output_dir={tmp_path}/file is a file, not a dir"):
        prepare_output(tmp_path / "file", {}, "cd", overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"
    prepare_output(tmp_path / "build", {}, "cd", overwrite=False)  # started, not finished
    with pytest.raises(ShardFormatError, match="the `kiln data` build in .* has not finished"):
        read_manifest(tmp_path / "build")


def test_a_reused_tokenizer_without_kilns_special_tokens_is_refused_before_the_build(
    hydra_context: None, tmp_path: Path
) -> None:
    """A plain SentencePiece model (no pad, no <mask>) given as tokenizer.path: said when the
    build is planned, not after scan and dedup."""
    import sentencepiece as spm

    from data_pipeline.pipeline import fingerprint_payload, plan_sources

    words = [f"w{i} x{i % 7} y{i % 11}" for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(tmp_path / "p"),
                                   vocab_size=25, minloglevel=2)  # fmt: skip
    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    text.write_text("\n".join(words))
    cfg = make_config(hydra_context, ["corpus=files", f"corpus.sources.0.paths=[{text.parent}]",
                                      f"tokenizer.path={tmp_path / 'p.model'}"])  # fmt: skip
    with pytest.raises(PipelineError, match=r"tokenizer.path: tokenizer .*p.model lacks special "
                       r"tokens: pad, mask \(kiln needs pad"):  # fmt: skip
        fingerprint_payload(cfg, plan_sources(cfg))


def test_an_input_edited_in_place_is_other_input(hydra_context: None, tmp_path: Path) -> None:
    """The fingerprint holds each input's modification time beside its name and size: a file
    edited at the same size (a typo fixed) is other input, so a rerun is refused, not 'up to
    date' with the old text."""
    from data_pipeline.pipeline import plan_sources

    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    text.write_text("def f(x):\n    return x\n" * 40)
    cfg = make_config(hydra_context, ["corpus=files", f"corpus.sources.0.paths=[{text.parent}]"])
    before = plan_sources(cfg)[0].inputs_digest
    assert plan_sources(cfg)[0].inputs_digest == before
    stat = text.stat()
    text.write_text(text.read_text().replace("x", "y", 1))  # the same size
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert text.stat().st_size == stat.st_size
    assert plan_sources(cfg)[0].inputs_digest != before


def test_reused_tokenizer_gives_the_same_shards(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path, tmp_path
) -> None:
    out = tmp_path / "reuse"
    overrides = mix_overrides(corpus[0]) + [
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        f"tokenizer.path={reference / 'tokenizer.model'}",
        "tokenizer.vocab_size=64",  # ignored: the reused model decides
    ]
    build_outputs(make_config(hydra_context, overrides))
    ours, theirs = output_hashes(out), output_hashes(reference)
    assert ours.pop("manifest.json") != theirs.pop("manifest.json")  # another fingerprint
    assert ours == theirs
    assert read_manifest(out).tokenizer.vocab_size == 800


def write_bad_corpus(directory: Path) -> None:
    rng = random.Random(3)
    good = [json.dumps({"text": prose(rng, 60)}) for _ in range(20)]
    lines = [
        *good[:10],
        "{not json",  # malformed_json
        "[1, 2, 3]",  # malformed_json: not an object
        json.dumps({"body": "no text field"}),  # missing_field
        json.dumps({"text": None}),  # missing_field
        json.dumps({"text": "   \n  "}),  # empty
        json.dumps({"text": prose(rng, 4000)}),  # too_large (corpus.max_doc_bytes=20000)
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n'  # not_utf8
    (directory / "mixed.jsonl").write_bytes(data + "\n".join(good[10:]).encode() + b"\n")
    whole = gzip.compress("\n".join(good).encode() + b"\n")
    (directory / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # truncated
    (directory / "gone.jsonl").symlink_to(directory / "missing.jsonl")  # unreadable
    # good documents in every other format
    texts = [prose(rng, 60) for _ in range(6)]
    payload = "".join(json.dumps({"text": text}) + "\n" for text in texts[:2]).encode()
    (directory / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    pq.write_table(pa.table({"text": texts[2:5]}), directory / "more.parquet")
    (directory / "note.txt").write_text(texts[5])
    (directory / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 50)  # not_utf8


def test_bad_input_is_counted_and_skipped(
    hydra_context: None, ray_head: RayHead, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad"
    source.mkdir()
    write_bad_corpus(source)
    out = tmp_path / "out"
    overrides = [
        "corpus=files",
        f"corpus.sources.0.paths=[{source}/*]",
        "corpus.max_doc_bytes=20000",
        "tokenizer.vocab_size=400",
        "tokenizer.n_sentinels=4",
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        "max_error_fraction=1.0",
    ]
    build_outputs(make_config(hydra_context, overrides))
    report = json.loads((out / "report.json").read_text())
    skipped = report["sources"]["main"]["skipped"]
    assert skipped == {
        "malformed_json": 2,
        "missing_field": 2,
        "not_utf8": 2,
        "empty": 1,
        "too_large": 1,
        "truncated": 1,
        "unreadable": 1,
    }
    # 20 good jsonl lines, 6 in zst, parquet and txt, and what precedes the damage in cut.gz
    assert 26 < report["sources"]["main"]["documents_read"] < 26 + 20
    per_file = report["bad_input_files"]
    assert per_file[str(source / "gone.jsonl")] == {"unreadable": 1}
    assert per_file[str(source / "cut.jsonl.gz")] == {"truncated": 1}
    capsys.readouterr()
    print_summary(report)  # the final table: an empty document is not bad input
    header, row = (
        line
        for line in capsys.readouterr().out.splitlines()
        if "docs in" in line or "│ main" in line
    )
    cells = dict(zip(header.split("┃")[1:-1], row.split("│")[1:-1], strict=True))
    assert {k.strip(): v.strip() for k, v in cells.items() if k.strip() in ("empty", "bad")} == {
        "empty": "1",
        "bad": "9",
    }


def test_too_much_bad_input_fails_naming_the_worst_file(tmp_path: Path, ray_head: RayHead) -> None:
    source = tmp_path / "bad"
    source.mkdir()
    write_bad_corpus(source)
    out = tmp_path / "out"
    result = kiln_data(
        "corpus=files", f"corpus.sources.0.paths=[{source}/*]", "corpus.max_doc_bytes=20000",
        f"output_dir={out}", f"ray.address={ray_head.address}", "max_error_fraction=0.05",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"Worst file: {source / 'mixed.jsonl'}" in result.stderr
    assert "max_error_fraction=0.05" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "mixed.jsonl" in report["message"]
    assert not (out / "manifest.json").exists()


def test_overwrite_rebuilds_with_the_new_config(
    hydra_context: None, corpus: tuple[Path, dict], ray_head: RayHead, reference: Path, tmp_path
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "shards" / "stray.txt").write_text("not ours")  # removed with the old shards
    overrides = mix_overrides(corpus[0]) + [
        f"output_dir={out}",
        f"ray.address={ray_head.address}",
        "tokenizer.vocab_size=900",
        "overwrite=true",
    ]
    build_outputs(make_config(hydra_context, overrides))
    manifest = read_manifest(out)
    assert manifest.tokenizer.vocab_size == 900
    assert manifest.config["tokenizer"]["vocab_size"] == 900
    assert not (out / "shards" / "stray.txt").exists()
    assert {p.name for p in (out / "shards").iterdir()} == {
        Path(s.path).name for s in manifest.shards
    }
