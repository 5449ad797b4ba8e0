"""The config tree: every option of every group composes into the typed schema and validates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from pretrain.config import (
    GROUP_SCHEMAS,
    ConfigError,
    DecoderConfig,
    DeepSpeedEngineConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    KilnConfig,
    SlurmClusterConfig,
    build_config,
    register_configs,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "hydra_conf"
PRIMARY = ("data", "train", "launch", "plan", "export", "report")
GROUPS = tuple(GROUP_SCHEMAS) + ("experiment",)
OBJECTIVE_FOR = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}
MODEL_FAMILY = {
    "bert_base": EncoderConfig,
    "t5_base": EncoderDecoderConfig,
    "tiny_encoder": EncoderConfig,
    "tiny_encoder_decoder": EncoderDecoderConfig,
    "tiny_moe_encoder": EncoderConfig,
    "tiny_moe_t5": EncoderDecoderConfig,
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def compose_config(primary: str, overrides: list[str]) -> KilnConfig:
    return build_config(compose(primary, overrides=overrides))


def test_required_groups_and_presets_exist() -> None:
    required = {
        "model",
        "objective",
        "engine",
        "optim",
        "data",
        "corpus",
        "cluster",
        "logger",
        "experiment",
    }
    assert required <= {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert {
        "tiny_decoder",
        "tiny_encoder",
        "tiny_encoder_decoder",
        "tiny_moe",
        "gpt2_124m",
        "gpt2_350m",
        "llama_1b",
        "llama_8b",
        "bert_base",
        "t5_base",
        "mixtral_8x7b",
    } <= set(options("model"))
    for primary in PRIMARY:
        assert (CONF_DIR / f"{primary}.yaml").is_file()


def test_the_subcommands_share_everything_but_their_hydra_settings() -> None:
    """Each primary config is `base` plus its own `hydra:` section (job name, help, output
    directory, logging), so an option that composes under one subcommand composes under all
    of them: the test below composes every option under `train` alone, and this one holds
    the subcommands to that shape."""
    for primary in PRIMARY:
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{primary}.yaml"))
        defaults = raw.pop("defaults")
        assert defaults[:3] == ["base", "_self_", {"experiment": None}], primary
        overrides = [key for entry in defaults[3:] for key in entry]
        assert all(key.startswith("override hydra/") for key in overrides), primary
        assert list(raw) == ["hydra"], primary
        assert raw["hydra"]["job"]["name"] == primary
        assert isinstance(compose_config(primary, []), KilnConfig)


def test_every_option_of_every_group_composes() -> None:
    count = 0
    for group in GROUPS:
        for option in options(group):
            overrides = [f"{group}={option}"]
            if group == "model":
                family = MODEL_FAMILY.get(option, DecoderConfig).family
                overrides.append(f"objective={OBJECTIVE_FOR[family]}")
                overrides.append("data.seq_len=128")
            if group == "objective":
                family = {"clm": "tiny_decoder", "mlm": "tiny_encoder"}.get(
                    option, "tiny_encoder_decoder"
                )
                overrides += [f"model={family}", "data.seq_len=128"]
            cfg = compose_config("train", overrides)
            assert isinstance(cfg, KilnConfig)
            if group == "model":
                assert isinstance(cfg.model, MODEL_FAMILY.get(option, DecoderConfig))
                assert cfg.model.name == option
            count += 1
    assert count >= 40


@pytest.mark.parametrize("primary", PRIMARY)
def test_every_experiment_composes_under_every_subcommand(primary: str) -> None:
    """Experiments overlay keys from many groups at once (`# @package _global_`): each one
    composes and validates under each subcommand."""
    for option in options("experiment"):
        cfg = compose_config(primary, [f"experiment={option}"])
        assert cfg.experiment_name == option


def test_schema_types_reach_the_code() -> None:
    cfg = compose_config("train", ["engine=zero3", "cluster=slurm", "model=llama_8b"])
    assert isinstance(cfg.engine, DeepSpeedEngineConfig) and cfg.engine.zero_stage == 3
    assert isinstance(cfg.cluster, SlurmClusterConfig) and cfg.cluster.time_limit == "01:00:00"
    assert isinstance(cfg.model, DecoderConfig)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_kv_heads) == (4096, 32, 8)
    assert not OmegaConf.is_config(cfg.model)


def test_a_pickled_config_loads_without_hydra_or_omegaconf() -> None:
    """What the ranks do with RUN_DIR/config.pkl: unpickle the typed config, with no Hydra or
    OmegaConf import (about 0.25 s per rank); `MISSING` is still OmegaConf's own value."""
    import pickle
    import subprocess
    import sys

    from omegaconf import MISSING

    from pretrain.config import MISSING as ours

    assert ours == MISSING
    cfg = compose_config("train", ["engine=zero3", "model=llama_8b"])
    probe = (
        "import pickle, sys; cfg = pickle.loads(sys.stdin.buffer.read()); "
        "print(type(cfg.engine).__name__, cfg.model.d_model, "
        "sorted(m for m in ('hydra', 'omegaconf') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], input=pickle.dumps(cfg),
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["DeepSpeedEngineConfig", "4096", "[]"]


def test_experiment_overlays_apply_to_every_subcommand() -> None:
    for primary in PRIMARY:
        cfg = compose_config(primary, ["experiment=demo"])
        assert cfg.experiment_name == "demo"
        assert cfg.cluster.accelerator == "cpu" and cfg.cluster.gpus_per_node == 2
        assert isinstance(cfg.engine, DeepSpeedEngineConfig) and cfg.engine.zero_stage == 2
        assert cfg.data.seq_len == 128 and cfg.data.path == "out/demo/data"
    # Command-line overrides still win over the experiment.
    cfg = compose_config("train", ["experiment=demo", "data.seq_len=64", "engine=fsdp"])
    assert cfg.data.seq_len == 64 and cfg.engine.kind == "fsdp"


def test_long_context_experiment() -> None:
    cfg = compose_config("train", ["experiment=long_context"])
    model = cfg.model
    assert isinstance(model, DecoderConfig) and model.rope_scaling.kind == "yarn"
    assert (model.attention_window, model.global_every, model.global_tokens) == (256, 2, 4)
    assert cfg.data.seq_len == 1024 and cfg.data.seq_len_warmup_steps == 100


def test_misspelled_key_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("plan", ["model.d_modle=3"])
    assert "d_modle" in str(info.value) + str(info.value.__cause__)


def test_unknown_option_names_the_group() -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config("plan", ["model=nonexistent"])
    assert "model/nonexistent" in str(info.value)


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", ["data.seq_len=long"])
    assert "data.seq_len" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=mlm"], "use objective=clm"),
        (["model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=64"),
        (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
        (
            ["engine=zero2", "engine.offload_params=true"],
            "engine.offload_params=true needs engine.zero_stage=3",
        ),
        (["cluster.nodes=3"], "data.global_batch_size=512 is not a multiple"),
        (
            ["model=gpt2_124m", "data.seq_len=2048"],
            "data.seq_len=2048 exceeds model.max_seq_len=1024",
        ),
        (
            ["+trainer.max_stpes=5"],  # Hydra's own hint for a misspelled key adds it
            "trainer.max_stpes is not a setting of kiln (did you mean trainer.max_steps",
        ),
        (
            ["model=bert_base", "objective=mlm"],
            "data.seq_len=1024 exceeds model.max_seq_len=512 .the size of its learned position "
            "table.; set data.seq_len=512 .or model.max_seq_len=1024.$",
        ),
        (
            ["model=llama_1b", "data.seq_len=16384"],
            "data.seq_len=16384 exceeds model.max_seq_len=8192 (the context the model "
            "declares: its export's max_position_embeddings",
        ),
        (
            ["model=tiny_moe", "model.moe.top_k=5"],
            "model.moe.top_k=5 must be between 1 and model.moe.n_experts=4",
        ),
        (
            ["data.seq_len=1000", "data.global_batch_tokens=524288"],
            "data.global_batch_tokens=524288 is not a multiple of data.seq_len=1000; use 524000 or 525000",
        ),
        (
            ["data.global_batch_tokens=40960", "data.micro_batch_size=16"],
            "data.global_batch_tokens=40960 / data.seq_len=1024 = 40 sequences is not a multiple of data.micro_batch_size=16",
        ),
        (["optim.schedule=linear"], "optim.schedule='linear' is not one of"),
        (["launch.rdzv_port=70000"], "launch.rdzv_port=70000 is not a TCP port"),
        (
            ["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=0.5"],
            "model.rope_scaling.factor=0.5 must be >= 1",
        ),
        (["model.global_every=2"], "model.global_every=2 needs model.attention_window"),
        (
            ["model=tiny_encoder_decoder", "objective=span", "model.attention_window=64"],
            "model.attention_window=64: encoder-decoders attend to the whole sequence",
        ),
        (["model.position=alibi", "model.rope_scaling.kind=linear"], "needs model.position='rope'"),
        (
            ["corpus=stdlib_mix", "corpus.sources.1.name=library"],
            "corpus.sources has repeated names",
        ),
        (["corpus.sources.0.name=my.source"], r"corpus.sources\[0\].name='my.source'"),
        (["trainer.profile.steps=0"], "trainer.profile.steps=0 must be > 0"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0"),
        (["trainer.eval_steps=0"], "trainer.eval_steps=0 must be > 0"),
        (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0 must be >= 1"),
        (["+data.mixture={web: 0.0}"], "data.mixture.web=0.0 must be > 0"),
        (["plan.memory_reserve=1.5"], r"plan.memory_reserve=1.5 must be in \[0, 1\)"),
        (
            ["trainer.max_steps=10", "trainer.profile.start_step=9"],
            "trainer.profile.start_step=9 with trainer.profile.steps=3 ends at step 11, after "
            "trainer.max_steps=10",
        ),
        (["engine.attention_backends=[fa3]"], "engine.attention_backends='fa3' is not one of"),
        (["engine.attention_backends=[math,math]"], "names a backend twice"),
        (
            ["engine.activation_checkpointing_every=2"],
            "engine.activation_checkpointing_every=2 picks the blocks activation checkpointing "
            "recomputes: set engine.activation_checkpointing=true too",
        ),
        (
            ["engine.activation_checkpointing=true", "engine.activation_checkpointing_every=0"],
            "engine.activation_checkpointing_every=0 must be > 0",
        ),
        (
            ["cluster.gpus_per_node=2", "trainer.profile.ranks=[0,2]"],
            r"trainer.profile.ranks=\[0, 2\]: rank.s. \[2\] not among the 2 ranks of the cluster",
        ),
        (
            ["engine=zero3", "trainer.async_checkpoint=true"],
            "trainer.async_checkpoint=true writes checkpoints in the background under engine=ddp "
            "or engine=fsdp; DeepSpeed .this run: ZeRO stage 3. writes its own",
        ),
        # the objectives' own settings, refused when composed (kiln plan too), not by the ranks
        (
            ["model=tiny_encoder", "objective=mlm", "objective.mask_prob=1.5"],
            "objective.mask_prob=1.5 must be in .0, 1.",
        ),
        (
            ["model=tiny_encoder_decoder", "objective=span", "objective.noise_density=1.0"],
            "objective.noise_density=1.0 must be in .0, 1.",
        ),
        (
            [
                "model=tiny_encoder_decoder",
                "objective=ul2",
                "objective.r_weight=0",
                "objective.s_weight=0",
                "objective.x_weight=0",
            ],
            "objective.r_weight, s_weight and x_weight are all 0: set one > 0",
        ),
        (
            ["model=tiny_encoder_decoder", "objective=span", "data.seq_len=4"],
            "data.seq_len=4 is too short for span corruption",
        ),
        (
            ["model=tiny_encoder", "objective=mlm", "data.seq_len_warmup_steps=10"],
            "data.seq_len_warmup_steps=10 warms up causal LM only",
        ),
        (
            [
                "engine=ddp",
                "engine.context_parallel=2",
                "cluster.gpus_per_node=2",
                "data.seq_len_warmup_steps=10",
            ],
            "set data.seq_len_warmup_steps=0 .or engine.context_parallel=1.",
        ),
    ],
)
def test_semantic_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        compose_config("train", overrides)


def test_global_batch_in_tokens_sets_the_sequence_count() -> None:
    cfg = compose_config("train", ["data.seq_len=512", "data.global_batch_tokens=262144"])
    assert cfg.data.global_batch_size == 512  # 262144 / 512
    cfg = compose_config("train", ["data.global_batch_size=64"])
    assert cfg.data.global_batch_tokens == 0 and cfg.data.global_batch_size == 64


def test_max_tokens_sets_the_step_count() -> None:
    overrides = ["data.seq_len=512", "data.global_batch_size=64", "trainer.max_tokens=1000000"]
    cfg = compose_config("train", overrides)
    assert cfg.trainer.max_steps == 31  # ceil(1e6 / (64 * 512))
    # as written in scientific notation too (Hydra reads 5e9 as a float)
    cfg = compose_config("train", [*overrides[:2], "trainer.max_tokens=5e9"])
    assert cfg.trainer.max_steps == 152588  # ceil(5e9 / 32768)
