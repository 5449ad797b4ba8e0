"""Consolidated checkpoints, the tokenizer export and `kiln export` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.tokenizer import load_processor, sentinel, train_tokenizer
from pretrain.atomic_dir import current_umask
from pretrain.checkpoint_io import (
    CheckpointError,
    load_consolidated,
    model_config_from_dict,
    save_consolidated,
)
from pretrain.config import (
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    KilnConfig,
    MoEConfig,
    RopeScalingConfig,
    TokenizerConfig,
    build_config,
    register_configs,
)
from pretrain.export import run
from pretrain.models import build_model
from pretrain.models.hf import export_model
from pretrain.models.hf.tokenizer import export_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
KILN = shutil.which("kiln", path=str(Path(sys.executable).parent)) or "kiln"
TOKENIZER_VOCAB = 600
MODEL_VOCAB = 640  # a model vocabulary may be larger than the tokenizer's (padded)

TEXTS = [
    (STDLIB / "textwrap.py").read_text("utf-8"),  # indentation, docstrings, newlines
    (STDLIB / "json" / "decoder.py").read_text("utf-8"),
    "def f(x):\n\tif x == 1234567890:\n\t\treturn 3.14\n    return -7e-3\n",
    "naïve café → 😀 日本語 Ωmega ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # byte fallback
    "  two  spaces, a trailing one \r\nand CRLF\n\n\n",
    "a , b . c ! d ?",  # no clean-up of spaces before punctuation
    f"x = {sentinel(0)} + <mask> * {sentinel(9)} </s>!",
    "<s>a</s> and a<pad>b<unk>",  # control pieces in text are spelled out, as SentencePiece does
    " ",
    "",
]


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = [p.read_text("utf-8") for p in sorted(STDLIB.glob("[a-f]*.py"))[:30]]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(sample, TokenizerConfig(vocab_size=TOKENIZER_VOCAB, n_sentinels=10), path)
    return path


def decoder(name: str = "tiny", **changes: object) -> DecoderConfig:
    values: dict = dict(name=name, vocab_size=MODEL_VOCAB, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_ff=176, max_seq_len=64)  # fmt: skip
    values.update(changes)
    return DecoderConfig(**values)


def tiny_model(cfg: DecoderConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


# --------------------------------------------------------------------------------------------
# tokenizer


def test_exported_tokenizer_encodes_and_decodes_like_sentencepiece(
    tokenizer: Path, tmp_path: Path
) -> None:
    export_tokenizer(tokenizer, tmp_path, model_max_length=64, padding_side="left")
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {
        p.name for p in tmp_path.iterdir()
    }
    processor = load_processor(tokenizer)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert type(exported).__name__ == "TokenizersBackend"  # the fast (Rust) tokenizer
    for text in TEXTS:
        ids = exported.encode(text, add_special_tokens=False)
        assert ids == processor.encode(text), text[:40]
        assert exported.decode(ids) == text
    assert 1 not in exported.encode(TEXTS[3], add_special_tokens=False)  # no <unk>: bytes
    assert exported("x")["input_ids"] == processor.encode("x")  # no BOS/EOS added


def test_exported_tokenizer_special_tokens(tokenizer: Path, tmp_path: Path) -> None:
    export_tokenizer(tokenizer, tmp_path, model_max_length=64, padding_side="left")
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert (exported.pad_token_id, exported.unk_token_id, exported.bos_token_id,
            exported.eos_token_id, exported.mask_token_id) == (0, 1, 2, 3, 4)  # fmt: skip
    sentinels = [sentinel(i) for i in range(10)]
    assert exported.convert_tokens_to_ids(sentinels) == list(range(5, 15))
    assert list(exported.extra_special_tokens) == sentinels
    assert len(exported) == TOKENIZER_VOCAB
    assert exported.model_max_length == 64 and exported.padding_side == "left"
    ids = exported.encode(f"a{sentinel(3)}b<mask>", add_special_tokens=False)
    assert 8 in ids and 4 in ids
    assert exported.decode(ids, skip_special_tokens=True) == "ab"
    batch = exported(["ab", "abcdef"], padding=True)["input_ids"]
    assert batch[0][0] == 0  # left padding with <pad>


def test_an_encoder_decoder_tokenizer_appends_eos_as_t5s(tokenizer: Path, tmp_path: Path) -> None:
    """Span-corruption inputs and targets end with EOS in training: the exported tokenizer of
    an encoder-decoder appends </s> when adding special tokens (transformers' default), as
    T5's own tokenizers do; without special tokens it still encodes as SentencePiece."""
    export_tokenizer(tokenizer, tmp_path, model_max_length=64, append_eos=True)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    plain = load_processor(tokenizer).encode(TEXTS[2])
    assert exported(TEXTS[2])["input_ids"] == [*plain, 3]
    assert exported(text_target="ab")["input_ids"][-1] == 3  # labels too
    assert exported(TEXTS[2], "ab")["input_ids"][len(plain)] == 3
    assert exported.encode(TEXTS[2], add_special_tokens=False) == plain
    batch = exported(["ab", "abcdef"], padding=True)["input_ids"]
    assert batch[0][-1] == 0 and 3 in batch[0] and batch[1][-1] == 3  # </s>, then <pad>


def test_tokenizer_larger_than_the_model_is_refused(tokenizer: Path, tmp_path: Path) -> None:
    cfg = decoder(vocab_size=512)
    with pytest.raises(ValueError, match="600 pieces but model.vocab_size=512"):
        export_model(tiny_model(cfg), cfg, tmp_path / "out", tokenizer_path=tokenizer)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# consolidated checkpoints


def test_consolidated_round_trip(tokenizer: Path, tmp_path: Path) -> None:
    cfg = decoder(tie_embeddings=True,
                  rope_scaling=RopeScalingConfig(kind="linear", factor=2.0))  # fmt: skip
    model = tiny_model(cfg)
    path = save_consolidated(model, cfg, tmp_path / "ckpt", tokenizer_path=tokenizer)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"
    ]  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    assert config["family"] == "decoder" and config["model"] == asdict(cfg)
    loaded_cfg, loaded = load_consolidated(path)
    assert loaded_cfg == cfg and isinstance(loaded_cfg.rope_scaling, RopeScalingConfig)
    ids = torch.randint(0, MODEL_VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    save_consolidated(model, cfg, path)  # replaces, without a tokenizer this time
    assert not (path / "tokenizer.model").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left


@pytest.mark.parametrize(
    "cfg",
    [
        EncoderConfig(name="enc", type_vocab_size=2, norm_position="pre",
                      moe=MoEConfig(n_experts=4, top_k=1, capacity_factor=1.25)),
        EncoderDecoderConfig(name="t5", n_encoder_layers=3, n_decoder_layers=5,
                             rope_scaling=RopeScalingConfig(kind="ntk", factor=4.0,
                                                            original_max_seq_len=512)),
    ],
)  # fmt: skip
def test_model_configs_of_every_family_rebuild(cfg: object) -> None:
    data = json.loads(json.dumps(asdict(cfg)))  # through JSON, as in config.json
    assert model_config_from_dict(type(cfg).family, data) == cfg


def test_bad_model_configs_name_the_key() -> None:
    with pytest.raises(CheckpointError, match="d_modle"):
        model_config_from_dict("decoder", {"d_modle": 3})
    with pytest.raises(CheckpointError, match="n_layers"):
        model_config_from_dict("decoder", {"n_layers": "many"})
    with pytest.raises(CheckpointError, match="unknown model family 'rnn'"):
        model_config_from_dict("rnn", {})


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_consolidated(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a consolidated checkpoint"):
        load_consolidated(tmp_path / "file")
    cfg = decoder()
    path = save_consolidated(tiny_model(cfg), cfg, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_consolidated(path)
    (path / "config.json").write_text(json.dumps({**config, "model": {**config["model"],
                                                                       "d_model": 32}}))  # fmt: skip
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_consolidated(path)


def test_training_checkpoints_open_with_their_model_and_tokenizer(
    tokenizer: Path, tmp_path: Path
) -> None:
    """`open_checkpoint` on the trainer's own checkpoints (DDP's layout here; every engine's,
    written by real runs, in test_engines.py): the model from trainer.json, the tokenizer
    copied beside it; a run directory gives its latest checkpoint; an older checkpoint with no
    model record takes the run's config.pkl."""
    import pickle
    from types import SimpleNamespace

    from pretrain.checkpoint_io import open_checkpoint

    cfg = decoder()
    model = tiny_model(cfg)
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}}, step / "engine.pt")
    record = {"step": 3, "model_family": "decoder", "model": asdict(cfg)}
    (step / "trainer.json").write_text(json.dumps(record))
    shutil.copyfile(tokenizer, step / "tokenizer.model")
    (run_dir / "checkpoints" / "latest").write_text(step.name)

    source = open_checkpoint(run_dir)  # no final/ yet: the latest checkpoint
    assert (source.path, source.kind, source.step) == (step, "ddp", 3)
    assert source.config == cfg and source.tokenizer == step / "tokenizer.model"
    loaded = source.load_model().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    (step / "tokenizer.model").unlink()
    (step / "trainer.json").write_text(json.dumps({"step": 3}))  # before models were recorded
    with pytest.raises(CheckpointError, match=r"names no model and .*run/config.pkl is missing"):
        open_checkpoint(step)
    run_config = SimpleNamespace(model=cfg, data=SimpleNamespace(path=str(tmp_path / "gone")))
    (run_dir / "config.pkl").write_bytes(pickle.dumps(run_config))
    source = open_checkpoint(step)
    assert source.config == cfg and source.tokenizer is None  # the shards are gone
    (step / "trainer.json").write_text("42")  # valid JSON, not a checkpoint's state
    with pytest.raises(CheckpointError, match=r"trainer.json: a JSON int, not a checkpoint's"):
        open_checkpoint(step)
    (step / "trainer.json").write_text(json.dumps({"step": 3}))
    (step / "engine.pt").unlink()
    with pytest.raises(CheckpointError, match="a training checkpoint of no engine kiln knows"):
        open_checkpoint(step)
    with pytest.raises(CheckpointError, match="is not a checkpoint: give a consolidated"):
        open_checkpoint(tmp_path)


def test_a_run_directory_gives_its_newest_weights(tokenizer: Path, tmp_path: Path) -> None:
    """A run resumed past its end keeps its old final/ until it ends again: the run directory
    opens as the newer of final/ (its recorded step) and the latest checkpoint; the
    checkpoints directory and the `latest` file open as the checkpoint named."""
    from pretrain.checkpoint_io import consolidated_step, open_checkpoint

    cfg = decoder()
    run_dir = tmp_path / "run"
    save_consolidated(tiny_model(cfg), cfg, run_dir / "final", tokenizer_path=tokenizer, step=4)
    assert consolidated_step(run_dir / "final") == 4
    for number in (2, 6):
        step = run_dir / "checkpoints" / f"step_{number:08d}"
        step.mkdir(parents=True)
        torch.save({"model": tiny_model(cfg).state_dict()}, step / "engine.pt")
        record = {"step": number, "model_family": "decoder", "model": asdict(cfg)}
        (step / "trainer.json").write_text(json.dumps(record))
    latest = run_dir / "checkpoints" / "latest"
    latest.write_text("step_00000002")
    assert (open_checkpoint(run_dir).kind, open_checkpoint(run_dir).step) == ("consolidated", 4)
    latest.write_text("step_00000006")  # trained on past final/'s step 4
    for path in (run_dir, run_dir / "checkpoints", latest):
        source = open_checkpoint(path)
        assert (source.kind, source.step, source.path.name) == ("ddp", 6, "step_00000006")
    latest.write_text("step_00000009")
    with pytest.raises(CheckpointError, match="latest names step_00000009, which is not a ch"):
        open_checkpoint(run_dir)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_damaged_fsdp_checkpoint_is_one_line(tmp_path: Path) -> None:
    """A missing or cut DCP shard: torch.distributed.checkpoint raises a CheckpointException
    (a BaseException) or an EOFError; kiln names the checkpoint and the file."""
    import torch.distributed.checkpoint as dcp

    from pretrain.checkpoint_io import open_checkpoint

    cfg = decoder()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    dcp.save({"model": tiny_model(cfg).state_dict()}, checkpoint_id=str(step / "fsdp"),
             no_dist=True)  # fmt: skip
    record = {"step": 2, "model_family": "decoder", "model": asdict(cfg)}
    (step / "trainer.json").write_text(json.dumps(record))
    assert open_checkpoint(step).kind == "fsdp"
    [shard] = (step / "fsdp").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"step_00000002 \(fsdp checkpoint\): "):
        open_checkpoint(step).load_model()
    shard.unlink()
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(step).load_model()
    assert "(fsdp checkpoint): FileNotFoundError" in str(error.value)
    assert shard.name in str(error.value) and "\n" not in str(error.value)


def test_init_weights_from_a_transformers_directory(tmp_path: Path) -> None:
    """`trainer.init_from` a transformers directory (an export, or a model of one of the
    classes `import_model` maps): the weights arrive exactly; another shape is refused with
    the differing parameter and keys."""
    from pretrain.checkpoint_io import init_weights

    cfg = decoder(name="tiny_llama")
    model = tiny_model(cfg)
    export_model(model, cfg, tmp_path / "hf", tokenizer_path=None)
    fresh = build_model(cfg)
    source = init_weights(fresh, cfg, tmp_path / "hf")
    assert source.kind == "transformers" and source.tokenizer is None
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    wide = decoder(name="tiny_llama", d_model=96)
    with pytest.raises(CheckpointError) as error:
        init_weights(build_model(wide), wide, tmp_path / "hf")
    assert "holds another model: embed.weight is [" in str(error.value)
    assert f"model.d_model={cfg.d_model} (now 96)" in str(error.value)


# --------------------------------------------------------------------------------------------
# kiln export


def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [KILN, "export", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("hf_class", "changes"),
    [("LlamaForCausalLM", {}),
     # QK-norm with sliding windows and a full-attention layer every second one
     ("Qwen3ForCausalLM", {"qk_norm": True, "attention_window": 4, "global_every": 2})],
)  # fmt: skip
def test_kiln_export_end_to_end(tokenizer: Path, tmp_path: Path, hf_class: str,
                                changes: dict) -> None:  # fmt: skip
    cfg = decoder(name="tiny_llama", **changes)
    model = tiny_model(cfg)
    save_consolidated(model, cfg, tmp_path / "ckpt", tokenizer_path=tokenizer)
    result = kiln("export.checkpoint=ckpt", "export.output_dir=hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    params = sum(p.numel() for p in model.parameters())
    assert f"{hf_class} (tiny_llama, {params:,} parameters, float32) to hf" in result.stdout
    assert "tokenizer from ckpt/tokenizer.model" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no run directory
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXTS[2]
    ids = torch.tensor([exported.encode(text, add_special_tokens=False)])
    assert ids[0].tolist() == load_processor(tokenizer).encode(text)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_kiln_export_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = kiln(f"export.checkpoint={tmp_path}/nowhere", cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("kiln export: ") and f"{tmp_path}/nowhere" in line
    assert "Traceback" not in result.stderr and result.stdout == ""
    result = kiln(cwd=tmp_path)  # nor the composed run directory
    assert result.returncode == 1 and result.stderr == (
        "kiln export: nothing to export: no run at trainer.run_dir=runs/default; pass the "
        "experiment and overrides the run trained with, or export.checkpoint=PATH: a "
        "consolidated checkpoint (RUN_DIR/final), a training checkpoint "
        "(RUN_DIR/checkpoints/step_N) or a run directory\n"
    )
    # both are said before torch and transformers are imported (seconds of the start)
    probe = ("import sys; from pretrain.config import KilnConfig; from pretrain.export import "
             "run; cfg = KilnConfig(); cfg.export.checkpoint = sys.argv[1]; code = run(cfg); "
             "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.stdout == "1 False False\n", result.stderr[-2000:]
    assert f"kiln export: export.checkpoint: {tmp_path}/nowhere does not exist" in result.stderr


def test_kiln_export_of_an_experiment_exports_its_run(tokenizer: Path, tmp_path: Path) -> None:
    """Without export.checkpoint, the composed trainer.run_dir (`kiln export experiment=demo`
    after `kiln train experiment=demo`); a checkpoint `trainer.keep_checkpoints` pruned is
    named with the ones its directory holds."""
    cfg = decoder(name="tiny_llama")
    run_dir = tmp_path / "out" / "demo" / "run"
    save_consolidated(tiny_model(cfg), cfg, run_dir / "final", tokenizer_path=tokenizer, step=7)
    result = kiln("experiment=demo", "export.output_dir=hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reading the consolidated checkpoint out/demo/run/final at step 7\n" in result.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    checkpoints = run_dir / "checkpoints"
    for step in (1000, 600, 800):
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
    result = kiln(f"export.checkpoint={checkpoints}/step_00000200", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"kiln export: export.checkpoint: {checkpoints}/step_00000200 does not exist; "
        f"{checkpoints} holds step_00000600, step_00000800, step_00001000\n"
    )


def export_config(*overrides: str) -> KilnConfig:
    return build_config(compose("export", overrides=list(overrides)))


def test_export_errors_exit_1_with_the_reason(
    tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert run(export_config(f"export.checkpoint={tmp_path}/file")) == 1
    assert "file is not a checkpoint: give a consolidated checkpoint" in capsys.readouterr().err

    nope = decoder(position="none")  # a decoder without positions: no transformers class
    save_consolidated(tiny_model(nope), nope, tmp_path / "nope")
    out = tmp_path / "out"
    assert run(export_config(f"export.checkpoint={tmp_path}/nope",
                             f"export.output_dir={out}")) == 1  # fmt: skip
    assert "model.position='none'" in capsys.readouterr().err
    assert not out.exists()
    config = json.loads((tmp_path / "nope" / "config.json").read_text())
    config["model"].update(position="rope", moe={"n_experts": 4})  # weights of a dense model
    (tmp_path / "nope" / "config.json").write_text(json.dumps(config))
    assert run(export_config(f"export.checkpoint={tmp_path}/nope")) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path}/nope/model.safetensors" in error and "blocks.1.mlp.up.weight" in error

    # a checkpoint without a tokenizer takes export.tokenizer; an existing output is kept
    cfg = decoder(name="tiny_gpt2", position="learned", norm="layernorm", activation="gelu",
                  bias=True, n_kv_heads=None, d_ff=256)  # fmt: skip
    save_consolidated(tiny_model(cfg), cfg, tmp_path / "gpt2")
    args = (f"export.checkpoint={tmp_path}/gpt2", f"export.output_dir={out}",
            f"export.tokenizer={tokenizer}", "export.dtype=bfloat16")  # fmt: skip
    assert run(export_config(*args)) == 0
    stdout = capsys.readouterr().out
    assert "GPT2LMHeadModel" in stdout and f"tokenizer from {tokenizer}" in stdout
    assert AutoTokenizer.from_pretrained(out).mask_token_id == 4
    assert run(export_config(*args)) == 1
    assert "exists and is not empty (overwrite=true replaces it)" in capsys.readouterr().err
    assert run(export_config(*args, "overwrite=true")) == 0
    weights = out / "model.safetensors"  # safetensors alone writes 0600
    assert weights.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_export_never_replaces_its_source_or_kiln_directories(
    tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """overwrite=true replaces the output whole: the checkpoint being read, a directory above
    it, and kiln's run, data and checkpoint directories are refused, before torch is imported;
    an output that is a file is named; an explicit export.tokenizer wins over the checkpoint's."""
    cfg = decoder(name="tiny_llama")
    run_dir = tmp_path / "run"
    save_consolidated(tiny_model(cfg), cfg, run_dir / "final", tokenizer_path=tokenizer)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for checkpoint, output, said in [
        (run_dir, run_dir, "holds the checkpoint being exported"),
        (run_dir / "final", run_dir / "final", "holds the checkpoint being exported"),
        (run_dir / "final", tmp_path, "holds the checkpoint being exported"),
        (run_dir, run_dir / "final", "is a kiln run, data or checkpoint directory (it has "
                                     "config.json of a kiln checkpoint)"),
        (run_dir / "final", tmp_path / "data", "(it has manifest.json)"),
        (run_dir / "final", tmp_path / "file", "is a file, not a directory"),
    ]:  # fmt: skip
        args = (f"export.checkpoint={checkpoint}", f"export.output_dir={output}")
        assert run(export_config(*args, "overwrite=true")) == 1
        assert said in capsys.readouterr().err, (checkpoint, output)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before

    args = (f"export.checkpoint={run_dir}", f"export.output_dir={tmp_path}/hf")
    assert run(export_config(*args, f"export.tokenizer={tmp_path}/missing.model")) == 1
    assert f"export.tokenizer: {tmp_path}/missing.model does not exist" in capsys.readouterr().err
    other = tmp_path / "other.model"
    shutil.copyfile(tokenizer, other)
    assert run(export_config(*args, f"export.tokenizer={other}")) == 0
    stdout = capsys.readouterr().out
    assert f"reading the consolidated checkpoint {run_dir}/final\n" in stdout
    assert f"tokenizer from {other}" in stdout
