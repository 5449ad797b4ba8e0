"""The shard loader: exactly-once delivery across ranks and DataLoader workers, exact resume at
the same and at other world sizes, equal batch counts, mixtures, bad shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data_pipeline.shards import (
    Manifest,
    ShardFormatError,
    TokenizerRecord,
    iter_documents,
    read_manifest,
    write_manifest,
    write_shard,
)
from pretrain.config import (
    CausalLMConfig,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    MaskedLMConfig,
    SpanCorruptionConfig,
    UL2Config,
)
from pretrain.data.loader import DataError, LoaderState, build_loader, build_run_loader
from pretrain.data.shard_reader import ShardIndex, SourceStream
from pretrain.models import build_model

VOCAB = 1000
EOS = 3
SEQ = 32


class CausalWindows:
    """A minimal causal-LM transform: the loader's raw window, split into input and labels."""

    def raw_length(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, tokens, document_ids, rng):  # noqa: ANN001, ANN204
        return {"input_ids": tokens[:-1], "labels": tokens[1:], "document_ids": document_ids[:-1]}


def write_corpus(
    out: Path, sizes: dict[str, list[int]], weights: dict[str, float], sentinels: int = 0
) -> Manifest:
    """Synthetic shards: for each source, shards holding the given numbers of documents of
    random lengths (uneven on purpose), tokens drawn above the special ids."""
    rng = np.random.default_rng(0)
    records = []
    for source, shard_docs in sizes.items():
        for index, n_docs in enumerate(shard_docs):
            docs = [rng.integers(5, VOCAB, rng.integers(3, 60)) for _ in range(n_docs)]
            blocks = [docs[i : i + 7] for i in range(0, n_docs, 7)]
            records.append(write_shard(out, source, "train", index, blocks, VOCAB))
    tokenizer = TokenizerRecord("tokenizer.model", "ab" * 32, VOCAB, "bpe",
                                {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4},
                                list(range(5, 5 + sentinels)))  # fmt: skip
    manifest = Manifest("f" * 64, tokenizer, records, weights)
    write_manifest(out, manifest)
    return manifest


def write_corpus_with_val(out: Path, id_ranges: dict[str, tuple[int, int]]) -> Manifest:
    """Synthetic shards with a held-out split: per source, one train shard of 300 documents and
    one val shard of 60, its tokens drawn from its own id range [low, high) (a narrow range is
    an easy source to learn), the sources weighted alike."""
    rng = np.random.default_rng(1)
    records = []
    for source, (low, high) in id_ranges.items():
        for split, n_docs in (("train", 300), ("val", 60)):
            docs = [rng.integers(low, high, rng.integers(3, 60)) for _ in range(n_docs)]
            blocks = [docs[i : i + 7] for i in range(0, n_docs, 7)]
            records.append(write_shard(out, source, split, 0, blocks, VOCAB))
    tokenizer = TokenizerRecord("tokenizer.model", "ab" * 32, VOCAB, "bpe",
                                {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}, [])  # fmt: skip
    manifest = Manifest("e" * 64, tokenizer, records, dict.fromkeys(id_ranges, 1.0))
    write_manifest(out, manifest)
    return manifest


def config(out: Path, **data: object) -> SimpleNamespace:
    defaults = {"path": str(out), "seq_len": SEQ, "global_batch_size": 12, "micro_batch_size": 2,
                "shuffle_buffer": 24, "num_workers": 0, "seed": 5}  # fmt: skip
    return SimpleNamespace(
        data=DataConfig(**(defaults | data)), model=DecoderConfig(vocab_size=VOCAB)
    )


def collect(cfg: SimpleNamespace, *, rank: int, world: int, steps: int,
            state: LoaderState | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    loader = build_loader(
        cfg, CausalWindows(), rank=rank, world=world, state=state, num_steps=steps
    )
    return list(loader.loader)


def expected_stream(out: Path, source: str, epochs: int, seed: int) -> np.ndarray:
    """The source's stream rebuilt from the shards with iter_documents, epoch by epoch."""
    manifest = read_manifest(out)
    records = [r for r in manifest.shards if r.source == source]
    stream = SourceStream(out, source, records, EOS, seed)
    parts = []
    for epoch in range(epochs):
        order, _ = stream.order(epoch)
        assert sorted(order.tolist()) == list(range(len(records)))
        for shard in order:
            for doc in iter_documents(out / records[shard].path):
                parts += [doc.astype(np.int64), np.array([EOS])]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [40, 9, 23], "code": [17, 30]}, {"web": 0.75, "code": 0.25})
    return out


def rank_process(rank: int, cfg: SimpleNamespace, world: int, steps: int, result: str) -> None:
    batches = collect(cfg, rank=rank, world=world, steps=steps)
    rows = [(int(i), b["input_ids"][k].tolist(), b["labels"][k].tolist())
            for b in batches for k, i in enumerate(b["index"])]  # fmt: skip
    Path(f"{result}.{rank}").write_text(json.dumps({"batches": len(batches), "rows": rows}))


def test_each_sample_once_across_two_ranks_and_two_workers(corpus: Path, tmp_path: Path) -> None:
    """2 real rank processes x 2 DataLoader worker processes; every global sample once, with
    the tokens of the stream window it names; equal batch counts per rank."""
    cfg = config(corpus, num_workers=2)
    steps = 40  # 480 samples: more than an epoch of either source
    mp.start_processes(rank_process, args=(cfg, 2, steps, str(tmp_path / "r")), nprocs=2,
                       start_method="spawn")  # fmt: skip
    results = [json.loads(Path(f"{tmp_path / 'r'}.{rank}").read_text()) for rank in range(2)]
    assert results[0]["batches"] == results[1]["batches"] == steps * 3  # 12 / (2 x 2) = 3 per step
    rows = sorted(row for result in results for row in result["rows"])
    assert [row[0] for row in rows] == list(range(steps * 12))  # each global index exactly once
    # every sample holds the right window of its source's stream
    loader = build_loader(cfg, CausalWindows(), num_steps=0)
    order = loader.dataset.order()
    streams = {name: expected_stream(corpus, name, 8, cfg.data.seed) for name in ("web", "code")}
    per_source: dict[str, list[int]] = {"web": [], "code": []}
    for index, inputs, labels in rows:
        source, position = order.lookup(index)
        name = loader.dataset.sources[source]
        per_source[name].append(position)
        window = streams[name][position * SEQ : position * SEQ + SEQ + 1]
        assert inputs == window[:-1].tolist() and labels == window[1:].tolist()
    for positions in per_source.values():  # each source read in order, no gaps, no repeats
        assert sorted(positions) == list(range(len(positions)))
    assert len(per_source["web"]) / len(rows) == pytest.approx(0.75, abs=0.02)


def test_resume_gives_the_uninterrupted_sequence(corpus: Path) -> None:
    cfg = config(corpus, num_workers=2)
    full = collect(cfg, rank=1, world=2, steps=8)
    first = build_loader(cfg, CausalWindows(), rank=1, world=2, num_steps=5)
    head = list(first.loader)
    state = LoaderState.from_dict(json.loads(json.dumps(first.state_after(5).to_dict())))
    tail = collect(cfg, rank=1, world=2, steps=3, state=state)
    assert len(head) + len(tail) == len(full)
    for ours, theirs in zip(head + tail, full, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 3), (3, 2)])
def test_resume_at_another_world_size_repeats_and_skips_nothing(
    corpus: Path, before: int, after: int
) -> None:
    cfg = config(corpus)
    seen = []
    for rank in range(before):
        loader = build_loader(cfg, CausalWindows(), rank=rank, world=before, num_steps=4)
        seen += [int(i) for batch in loader.loader for i in batch["index"]]
    state = build_loader(cfg, CausalWindows(), num_steps=0).state_after(4)
    by_index = {}
    for rank in range(after):
        batches = collect(cfg, rank=rank, world=after, steps=3, state=state)
        assert len(batches) == 3 * 12 // (2 * after)  # the same count on every rank
        for batch in batches:
            for k, index in enumerate(batch["index"]):
                by_index[int(index)] = batch["input_ids"][k]
                seen.append(int(index))
    assert sorted(seen) == list(range(7 * 12))
    # a resumed sample is the sample an uninterrupted single-rank run gives at that index
    reference = collect(cfg, rank=0, world=1, steps=7)
    for batch in reference:
        for k, index in enumerate(batch["index"]):
            if int(index) in by_index:
                assert torch.equal(by_index[int(index)], batch["input_ids"][k])


def test_mixture_proportions_and_ledger(corpus: Path) -> None:
    cfg = config(corpus, shuffle_buffer=100, global_batch_size=20, micro_batch_size=5)
    loader = build_loader(cfg, CausalWindows(), num_steps=0)
    order = loader.dataset.order()
    web = loader.dataset.sources.index("web")
    sources = [order.lookup(i)[0] for i in range(4000)]
    assert np.mean(np.array(sources) == web) == pytest.approx(0.75, abs=0.02)
    for n in (100, 1000, 2000, 4000):  # after whole windows the counts are exact
        assert sum(1 for s in sources[:n] if s == web) == round(0.75 * n)
    ledger = loader.ledger(steps=200)  # 200 steps of 20 samples = 4000 samples
    assert ledger["web"]["samples"] == 3000 and ledger["code"]["samples"] == 1000
    assert ledger["web"]["tokens"] == 3000 * SEQ
    assert ledger["code"]["epochs"] > 1  # the small source repeats: its stream has epochs


def test_changing_weights_on_resume_never_rereads(corpus: Path) -> None:
    cfg = config(corpus)
    first = build_loader(cfg, CausalWindows(), num_steps=10)
    positions = {(int(first.dataset.order().lookup(i)[0]), first.dataset.order().lookup(i)[1])
                 for i in range(120)}  # fmt: skip
    state = first.state_after(10)
    changed = config(corpus, mixture={"web": 0.5, "code": 0.5})
    second = build_loader(changed, CausalWindows(), state=state, num_steps=10)
    assert len(second.state.segments) == 2 and second.state.segments[1].start == 120
    order = second.dataset.order()
    later = [order.lookup(i) for i in range(120, 240)]
    assert not positions & set(later)  # no source sample is read twice
    assert sum(1 for source, _ in later if source == 1) == 60  # the new weights apply
    for source in (0, 1):  # each source continues right after what it gave
        given = sorted(p for s, p in positions if s == source)
        assert min(p for s, p in later if s == source) == given[-1] + 1


@pytest.mark.parametrize("change", ["mixture", "shuffle_buffer"])
def test_a_change_on_resume_in_the_middle_of_a_shuffle_window_never_rereads(
    corpus: Path, change: str
) -> None:
    """120 samples into windows of 50, a source has given a shuffled part of the third
    window, not its first samples: the new order starts after that window (its 30 unread
    samples are left), where it started at the count given and read 11% of samples twice.
    A new data.shuffle_buffer starts a new order too; data.seed stays the run's."""
    cfg = config(corpus, shuffle_buffer=50)
    first = build_loader(cfg, CausalWindows(), num_steps=10)
    order = first.dataset.order()
    given = {order.lookup(i) for i in range(120)}
    state = LoaderState.from_dict(json.loads(json.dumps(first.state_after(10).to_dict())))
    assert (state.window, state.seed) == (50, 5)
    changes = {"mixture": {"mixture": {"web": 0.5, "code": 0.5}, "shuffle_buffer": 50},
               "shuffle_buffer": {"shuffle_buffer": 30}}[change]  # fmt: skip
    second = build_loader(config(corpus, seed=9, **changes), CausalWindows(), state=state,
                          num_steps=10)  # fmt: skip
    assert len(second.state.segments) == 2 and second.dataset.seed == 5  # the run's seed
    later = second.dataset.order()
    read = [later.lookup(i) for i in range(120, 240)]
    assert not given & set(read)  # no source sample is read twice
    window_end = {source: max(p for s, p in (order.lookup(i) for i in range(150)) if s == source)
                  for source in (0, 1)}  # fmt: skip
    for source in (0, 1):  # each continues after the third window, none of it left behind
        assert min(p for s, p in read if s == source) == window_end[source] + 1
    assert second.state_after(10).window == changes["shuffle_buffer"]


def test_missing_and_corrupt_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(corpus, out)
    manifest = read_manifest(out)
    web = [r for r in manifest.shards if r.source == "web"]
    (out / web[1].path).unlink()
    with pytest.raises(DataError, match=rf"{web[1].path}: missing.*on_bad_shard=skip"):
        build_loader(config(out), CausalWindows())
    path = out / web[2].path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # same size
    with pytest.raises(DataError, match=rf"{web[1].path}: missing"):
        build_loader(config(out, on_bad_shard="error"), CausalWindows())
    loader = build_loader(config(out, on_bad_shard="skip"), CausalWindows(), num_steps=5)
    assert len(loader.skipped_shards) == 2
    assert any(web[2].path in skipped for skipped in loader.skipped_shards)
    assert [r.path for r in loader.dataset.shards["web"]] == [web[0].path]
    assert len(list(loader.loader)) == 5 * 6  # training goes on with what is left
    shutil.copy(corpus / web[1].path, out / web[1].path)  # restore the missing one
    for verify in ("shard", "sample"):  # sample does all that shard does, and more
        with pytest.raises(DataError, match="sha256 differs"):
            build_loader(config(out, verify=verify), CausalWindows())


def test_damage_the_sizes_cannot_see_is_named(corpus: Path, tmp_path: Path) -> None:
    """Bytes flipped inside a shard, its size unchanged: a damaged array header is a bad shard
    (an error naming it, or skipped), not numpy's parser error; token ids past the tokenizer
    stop the run naming the shard as the block is read (verify=none does not read sha256s)."""
    out = tmp_path / "data"
    shutil.copytree(corpus, out)
    web = [r for r in read_manifest(out).shards if r.source == "web"]
    path = out / web[0].path
    data = bytearray(path.read_bytes())
    header = data.index(b"\x93NUMPY", 512)  # the first array's header, after its tar header
    data[header + 30 : header + 34] = b"\xff" * 4  # inside "{'descr': ..., 'shape': (N,), }"
    path.write_bytes(bytes(data))
    loader = build_loader(config(out, on_bad_shard="skip"), CausalWindows(), num_steps=1)
    assert [s for s in loader.skipped_shards if web[0].path in s and "not a numpy array" in s]
    loader = build_loader(config(out), CausalWindows(), num_steps=50)  # found when read
    with pytest.raises(ShardFormatError, match=rf"{web[0].path}.*not a numpy array"):
        for _ in loader.loader:
            pass

    shutil.copy(corpus / web[0].path, path)
    index = ShardIndex(path, web[0])
    data = bytearray(path.read_bytes())
    at = index.blocks[0].data_offset
    data[at : at + 8] = b"\xff" * 8  # uint16 ids 65535, far past the 1000-piece tokenizer
    path.write_bytes(bytes(data))
    loader = build_loader(config(out), CausalWindows(), num_steps=50)
    with pytest.raises(ShardFormatError, match=rf"{web[0].path}: block 0 holds token id 65535"):
        for _ in loader.loader:
            pass


def test_evaluation_leaves_out_a_source_without_held_out_shards(tmp_path: Path) -> None:
    """A source too small to hold a document out has no val shards: the others are evaluated
    (it turned evaluation off for the whole run); training still needs every source."""
    out = tmp_path / "data"
    manifest = write_corpus(out, {"web": [40], "one": [3]}, {"web": 0.8, "one": 0.2})
    rng = np.random.default_rng(1)
    docs = [rng.integers(5, VOCAB, 30) for _ in range(14)]
    val = write_shard(out, "web", "val", 0, [docs[:7], docs[7:]], VOCAB)
    write_manifest(out, Manifest(manifest.fingerprint, manifest.tokenizer,
                                 [*manifest.shards, val], manifest.weights))  # fmt: skip
    loader = build_loader(config(out), CausalWindows(), split="val", num_steps=1)
    assert list(loader.dataset.shards) == ["web"]
    assert len(list(loader.loader)) == 6  # 12 rows of 2
    (out / manifest.shards[-1].path).unlink()  # the train shard of "one"
    with pytest.raises(DataError, match="source 'one' has no usable train shards"):
        build_loader(config(out, on_bad_shard="skip"), CausalWindows())


def test_the_held_out_set_keeps_the_builds_weights_whatever_the_mixture(tmp_path: Path) -> None:
    """Evaluations of an ablation's mixtures (or across a change on resume) must read the same
    samples to compare: data.mixture weighs the training samples only."""
    out = tmp_path / "data"
    manifest = write_corpus(out, {"web": [40], "code": [30]}, {"web": 0.5, "code": 0.5})
    rng = np.random.default_rng(2)
    held = [write_shard(out, name, "val", 0, [[rng.integers(5, VOCAB, 30) for _ in range(8)]],
                        VOCAB) for name in ("web", "code")]  # fmt: skip
    write_manifest(out, Manifest(manifest.fingerprint, manifest.tokenizer,
                                 [*manifest.shards, *held], manifest.weights))  # fmt: skip

    def rows(**data: object) -> list[list[int]]:
        loader = build_loader(config(out, **data), CausalWindows(), split="val", num_steps=2)
        return [row.tolist() for batch in loader.loader for row in batch["input_ids"]]

    assert rows(mixture={"web": 0.9, "code": 0.1}) == rows()
    train = build_loader(config(out, mixture={"web": 0.9, "code": 0.1}), CausalWindows())
    assert train.dataset.segment.weights == {"web": 0.9, "code": 0.1}


def test_tokenizer_and_vocabulary_checks(corpus: Path) -> None:
    cfg = config(corpus)
    cfg.model = DecoderConfig(vocab_size=VOCAB - 1)
    with pytest.raises(DataError, match="model.vocab_size=999 is smaller"):
        build_loader(cfg, CausalWindows())
    state = LoaderState(samples=24, tokenizer_sha256="cd" * 32, seq_len=SEQ)
    with pytest.raises(DataError, match="another tokenizer"):
        build_loader(config(corpus), CausalWindows(), state=state)
    with pytest.raises(DataError, match=r"data.mixture names unknown source\(s\) \['books'\]"):
        build_loader(config(corpus, mixture={"books": 1.0}), CausalWindows())


def test_a_data_path_inside_the_output_and_the_build_command_are_named(
    corpus: Path, tmp_path: Path
) -> None:
    """data.path one level too deep names the output directory; with no shards at all, the
    `kiln data` command to run carries the run's experiment, and output_dir when it differs."""
    for inside in (corpus / "manifest.json", corpus / "shards", next(corpus.glob("shards/*"))):
        with pytest.raises(DataError) as error:
            build_loader(config(inside), CausalWindows())
        assert str(error.value) == (
            f"data.path={inside}: data.path is the kiln data output directory (the one holding "
            f"manifest.json): use data.path={corpus}"
        )
    missing = tmp_path / "missing"
    for experiment, output_dir, command in [
        (None, "out/data", f"kiln data output_dir={missing}"),
        ("demo", str(missing), "kiln data experiment=demo"),
        ("demo", "out/demo/data", f"kiln data experiment=demo output_dir={missing}"),
    ]:
        cfg = config(missing)
        cfg.experiment_name, cfg.output_dir = experiment, output_dir
        with pytest.raises(DataError) as error:
            build_loader(cfg, CausalWindows())
        assert str(error.value) == f"{missing}/manifest.json: no manifest (run `{command}` first)"


def test_sequence_length_warmup_keeps_every_token(corpus: Path) -> None:
    plain = collect(config(corpus), rank=0, world=1, steps=6)
    warm = collect(config(corpus, seq_len_warmup_steps=4, seq_len_warmup_start=8), rank=0,
                   world=1, steps=6)  # fmt: skip
    loader = build_loader(config(corpus, seq_len_warmup_steps=4, seq_len_warmup_start=8),
                          CausalWindows(), num_steps=0)  # fmt: skip
    assert [loader.dataset.seq_len_at(s) for s in range(5)] == [8, 8, 16, 16, 32]
    for ours, theirs in zip(warm, plain, strict=True):
        length = ours["input_ids"].shape[1]
        pieces = SEQ // length
        assert ours["input_ids"].shape == (2 * pieces, length)  # same tokens, shorter rows
        rows = ours["input_ids"].reshape(2, pieces * length)
        assert torch.equal(rows, theirs["input_ids"])
        assert torch.equal(ours["labels"].reshape(2, -1), theirs["labels"])


def test_evaluation_reads_whole_sequences_during_the_warmup(tmp_path: Path) -> None:
    """The held-out loader is built anew at each evaluation, at step 0: under sequence-length
    warmup it read step 0's short rows every time, so eval losses before and after the warmup
    measured other contexts."""
    write_corpus_with_val(tmp_path, {"web": (10, 200)})
    cfg = config(tmp_path, seq_len_warmup_steps=4, seq_len_warmup_start=8)
    train = build_loader(cfg, CausalWindows(), num_steps=1)
    assert train.dataset.seq_len_at(0) == 8
    val = build_loader(cfg, CausalWindows(), num_steps=2, split="val")
    assert [val.dataset.seq_len_at(step) for step in range(5)] == [SEQ] * 5
    batches = list(val.loader)
    assert len(batches) == 2 * 6 and {b["input_ids"].shape for b in batches} == {(2, SEQ)}


FAMILY_OF = {
    "clm": (CausalLMConfig(), DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2,
                                            d_ff=64, max_seq_len=64)),
    "mlm": (MaskedLMConfig(whole_word=False), EncoderConfig(vocab_size=VOCAB, d_model=32,
            n_layers=1, n_heads=2, d_ff=64, activation="gelu", norm="layernorm", bias=True,
            position="learned", max_seq_len=64, type_vocab_size=2)),
    "span": (SpanCorruptionConfig(), EncoderDecoderConfig(vocab_size=VOCAB, d_model=32,
             n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, activation="relu",
             position="relative", max_seq_len=64)),
    "ul2": (UL2Config(), EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, n_encoder_layers=1,
            n_decoder_layers=1, n_heads=2, d_ff=64, activation="relu", position="relative",
            max_seq_len=64)),
}  # fmt: skip


@pytest.mark.parametrize("kind", FAMILY_OF)
def test_every_objective_feeds_its_model_family(kind: str, tmp_path: Path) -> None:
    """The objective the config names, built from the manifest's tokenizer, gives exactly the
    tensors its model family takes; a loss on them is finite."""
    out = tmp_path / "data"
    write_corpus(out, {"web": [30, 20]}, {"web": 1.0}, sentinels=100)
    objective, model_cfg = FAMILY_OF[kind]
    cfg = config(out, num_workers=1)
    cfg.objective, cfg.model = objective, model_cfg
    batches = list(build_run_loader(cfg, num_steps=2).loader)
    assert len(batches) == 2 * 6
    model = build_model(model_cfg)
    for batch in batches[:2]:
        assert batch.pop("index").shape == (2,)
        labels = batch.pop("labels")
        logits = model(**batch)
        assert logits.shape[:2] == labels.shape
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        assert torch.isfinite(loss) and (labels != -100).any()


def test_validation_split_is_read_on_its_own(tmp_path: Path) -> None:
    out = tmp_path / "data"
    manifest = write_corpus(out, {"web": [30, 20]}, {"web": 1.0})
    rng = np.random.default_rng(1)
    docs = [rng.integers(5, VOCAB, 20) for _ in range(10)]
    manifest.shards.append(write_shard(out, "web", "val", 0, [docs], VOCAB))
    write_manifest(out, manifest)
    loader = build_loader(config(out), CausalWindows(), num_steps=1, split="val")
    assert [r.split for r in loader.dataset.shards["web"]] == ["val"]
    epoch = np.concatenate([np.append(doc, EOS) for doc in docs])
    stream = np.concatenate([epoch] * 20)  # one shard: every epoch has the same order
    order = loader.dataset.order()
    for batch in loader.loader:
        for row, index in zip(batch["input_ids"], batch["index"], strict=True):
            _, position = order.lookup(int(index))
            assert row.tolist() == stream[position * SEQ : position * SEQ + SEQ].tolist()
