"""Evaluation in `kiln train` on 2 CPU ranks (torchrun, gloo): the loss of each source of the
held-out split beside the overall one, in metrics.jsonl and in `kiln report`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_loader import VOCAB, write_corpus_with_val
from test_report import assert_png, summary_rows
from test_trainer import kiln_train, train_args

pytestmark = pytest.mark.slow


def eval_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r.get("kind") == "eval"}


def per_source_losses(overrides: list[str], run_dir: Path) -> tuple[dict, dict]:
    """Each source's summed loss and number of targets over the evaluation's samples, from
    the run's final weights in this one process: the val loader of the run's config (all
    `trainer.eval_steps` steps of it, as the ranks share them), each sample's source looked up
    from its global index."""
    from hydra import compose, initialize_config_module

    from pretrain.checkpoint_io import load_consolidated
    from pretrain.config import build_config, register_configs
    from pretrain.data.loader import build_run_loader

    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        cfg = build_config(compose("train", overrides=overrides))
    loader = build_run_loader(cfg, num_steps=cfg.trainer.eval_steps, split="val")
    order = loader.dataset.order()
    _, model = load_consolidated(run_dir / "final")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for batch in loader.loader:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
            losses = torch.nn.functional.cross_entropy(
                model(**inputs).flatten(0, 1), labels.flatten(), reduction="none"
            ).view(labels.shape)
            for row, index in enumerate(batch["index"].tolist()):
                name = loader.dataset.sources[order.lookup(index)[0]]
                sums[name] = sums.get(name, 0.0) + float(losses[row].sum())
                counts[name] = counts.get(name, 0) + int((labels[row] != -100).sum())
    return sums, counts


def test_each_source_of_the_held_out_split_has_its_eval_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two sources: each evaluation also logs `eval_loss/SOURCE`, from the same forward passes
    on 2 data-parallel ranks: the mean loss of that source's targets, as this process finds it
    from the final weights. Weighted by their numbers of targets (every position of a causal
    sample), the sources' losses average to `eval_loss`. The narrow source is the easier one.
    `kiln report` plots them and gives each one's last loss."""
    from pretrain.report import report_run

    corpus = tmp_path / "shards"
    write_corpus_with_val(corpus, {"web": (5, VOCAB), "code": (5, 40)})
    run_dir = tmp_path / "run"
    overrides = train_args(corpus, run_dir, "trainer.max_steps=6", "trainer.eval_every=3",
                           "trainer.eval_steps=2", "trainer.checkpoint_every=0")  # fmt: skip
    result = kiln_train(overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = eval_records(run_dir)
    assert sorted(evals) == [3, 6]
    for record in evals.values():
        assert set(record) == {"step", "kind", "time", "eval_loss", "eval_ppl", "eval_loss/web",
                               "eval_loss/code"}  # fmt: skip
        assert all(math.isfinite(record[key]) for key in record if key.startswith("eval_"))
        assert record["eval_loss/code"] < record["eval_loss"] < record["eval_loss/web"]
    # on the console the eval line ends with them (keys with "/" stay off it otherwise)
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("step 6 | eval |")]
    said = dict(part.split() for part in line.split(" | by source: ")[1].split(", "))
    assert said == {name: f"{evals[6][f'eval_loss/{name}']:.4g}" for name in ("web", "code")}

    sums, counts = per_source_losses(overrides, run_dir)
    last = evals[6]  # the final weights' evaluation
    assert sorted(counts) == ["code", "web"] and sum(counts.values()) == 2 * 8 * 32
    for name in counts:
        assert last[f"eval_loss/{name}"] == pytest.approx(sums[name] / counts[name], rel=1e-5)
    weighted = sum(last[f"eval_loss/{name}"] * n for name, n in counts.items())
    assert weighted / sum(counts.values()) == pytest.approx(last["eval_loss"], rel=1e-6)

    report_run(run_dir, None)
    rows = summary_rows(capsys.readouterr().out)
    for name in ("web", "code"):
        assert rows[f"eval loss ({name})"] == f"{last[f'eval_loss/{name}']:.4f} at step 6"
    assert_png(run_dir / "report" / "eval_loss_by_source.png")


def test_a_single_source_logs_no_per_source_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain.report import report_run

    corpus = tmp_path / "shards"
    write_corpus_with_val(corpus, {"web": (5, VOCAB)})
    run_dir = tmp_path / "run"
    overrides = train_args(corpus, run_dir, "trainer.max_steps=2", "trainer.eval_every=2",
                           "trainer.eval_steps=1", "trainer.checkpoint_every=0")  # fmt: skip
    result = kiln_train(overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = eval_records(run_dir).values()
    assert set(record) == {"step", "kind", "time", "eval_loss", "eval_ppl"}
    assert math.isfinite(record["eval_loss"]) and "by source" not in result.stdout
    report_run(run_dir, None)
    assert not any(
        label.startswith("eval loss (") for label in summary_rows(capsys.readouterr().out)
    )
    assert not (run_dir / "report" / "eval_loss_by_source.png").exists()
