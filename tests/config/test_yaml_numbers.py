"""How config values are read: YAML 1.2 numbers in files and overrides, string keys kept as
written, integer keys refusing YAML 1.1 forms, number strings in model.overrides, the seed's
range (sweep22 findings 4, 5 and 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memopt.config import Config, ModelConfig
from memopt.config.workload import llama_config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("checkpoint.directory=2024_11_24", "2024_11_24"),  # YAML 1.1: the int 20241124
        ("checkpoint.directory=0123", "0123"),  # YAML 1.1: octal 83
        ("checkpoint.directory=1.10", "1.10"),  # the float would print as 1.1
        ("checkpoint.directory=2024-11-24", "2024-11-24"),  # YAML 1.1: a date (refused)
        ("checkpoint.directory=1e3  # a comment", "1e3"),
        ("checkpoint.directory='0123'", "0123"),
        ("model.init_from=007", "007"),
        ("sharding.nvme_path=0x1f", "0x1f"),
        ("activations.budget=6e9", "6e9"),
        ("checkpoint.directory=null", None),
        ("checkpoint.directory=~", None),
    ],
)
def test_a_string_key_keeps_the_override_text(override: str, expected: str | None) -> None:
    section, rest = override.split(".", 1)
    key = rest.split("=", 1)[0]
    assert getattr(getattr(Config.from_dict({}, [override]), section), key) == expected


def test_a_string_key_keeps_the_file_text(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("checkpoint:\n  directory: 2024_11_24\n  every_n_steps: 050\n"
                    "model:\n  init_from: 1.10\n"
                    "sharding: {offload: nvme, nvme_path: 0123}\n"
                    "optimizer: {lr: 1e-3, target: 10}\n")
    cfg = Config.from_yaml(path)
    assert cfg.checkpoint.directory == "2024_11_24" and cfg.model.init_from == "1.10"
    assert cfg.sharding.nvme_path == "0123" and cfg.optimizer.target == "10"
    assert cfg.checkpoint.every_n_steps == 50  # decimal, not octal 40
    assert cfg.optimizer.lr == 1e-3
    again = tmp_path / "again.yaml"
    cfg.to_yaml(again)  # (to_yaml quotes what YAML would read as a number)
    assert Config.from_yaml(again) == cfg


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.steps=010", "steps", 10),  # YAML 1.1: octal 8
        ("train.steps=1e2", "steps", 100),
        ("train.log_every=+5", "log_every", 5),
    ],
)
def test_integers_are_decimal(override: str, key: str, expected: int) -> None:
    assert getattr(Config.from_dict({}, [override]).train, key) == expected


@pytest.mark.parametrize(
    "override",
    ["train.steps=0x1f", "train.steps=1_000", "train.steps=1:30", "checkpoint.every_n_steps=0o17",
     "optimizer.lr=1_0.5"],
)
def test_yaml11_number_forms_are_refused_for_numbers(override: str) -> None:
    key = override.split("=", 1)[0]
    with pytest.raises(ValueError, match=f"'{key}'.*no '_'"):
        Config.from_dict({}, [override])


def test_yaml12_floats_and_yaml11_booleans() -> None:
    cfg = Config.from_dict({}, ["optimizer.lr=3e-4", "optimizer.betas=[0.5, 6e-1]",
                                "checkpoint.fsync=off"])
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == (0.5, 0.6)
    assert cfg.checkpoint.fsync is False


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("model.overrides.rms_norm_eps=1e-5", "rms_norm_eps", 1e-5),
        ("model.overrides.initializer_range=2e-2", "initializer_range", 0.02),
        ("model.overrides.attention_dropout=1e-1", "attention_dropout", 0.1),
    ],
)
def test_model_overrides_take_numbers_without_a_dot(override: str, key: str,
                                                    expected: float) -> None:
    cfg = Config.from_dict({}, [override])
    assert cfg.model.overrides[key] == expected and isinstance(cfg.model.overrides[key], float)
    assert getattr(llama_config(cfg), key) == pytest.approx(expected)


def test_model_overrides_number_strings_from_python_and_files(tmp_path: Path) -> None:
    model = ModelConfig(overrides={"rms_norm_eps": "1e-5", "hidden_act": "silu",
                                   "rope_scaling": {"factor": "2e0"}})
    assert model.overrides == {"rms_norm_eps": 1e-5, "hidden_act": "silu",
                               "rope_scaling": {"factor": 2.0}}
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  overrides: {rms_norm_eps: 1e-5, num_hidden_layers: 03}\n")
    assert Config.from_yaml(path).model.overrides == {"rms_norm_eps": 1e-5,
                                                      "num_hidden_layers": 3}


@pytest.mark.parametrize("seed", ["1e30", "-1", str(2**63)])
def test_seed_out_of_range_is_refused(seed: str) -> None:
    with pytest.raises(ValueError, match=r"'train.seed' must lie in \[0, 2\*\*63\)"):
        Config.from_dict({}, [f"train.seed={seed}"])
    assert Config.from_dict({}, [f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1
