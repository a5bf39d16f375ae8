"""CLI/config contract: defaults < YAML < flags; unknown keys are errors; resolved config is saved."""

import pytest
import yaml

from alignkit.config import parse, save_config
from alignkit.recipes.sft import SFTConfig


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"lr": 0.5, "batch_size": 3, "data": ["a.jsonl", "b.jsonl"], "max-steps": 7}))
    cfg = parse(SFTConfig, ["--config", str(cfg_file), "--batch-size", "5"])
    assert cfg.lr == 0.5  # from YAML
    assert cfg.batch_size == 5  # flag beats YAML
    assert cfg.max_steps == 7  # YAML key spelled with a dash works too
    assert cfg.grad_accum == SFTConfig().grad_accum  # default
    assert cfg.data == ("a.jsonl", "b.jsonl")
    # A repeatable flag replaces the YAML list rather than appending to it.
    cfg = parse(SFTConfig, ["--config", str(cfg_file), "--data", "c.jsonl", "--data", "d.jsonl"])
    assert cfg.data == ("c.jsonl", "d.jsonl")


def test_contract_flags_spelled_exactly():
    cfg = parse(SFTConfig, ["--model", "m", "--data", "x", "--output", "o", "--max-steps", "2", "--epochs", "3",
                            "--batch-size", "4", "--grad-accum", "5", "--max-length", "64", "--lr", "0.01",
                            "--seed", "9", "--resume"])
    assert (cfg.model, cfg.data, cfg.output, cfg.max_steps, cfg.epochs, cfg.batch_size, cfg.grad_accum,
            cfg.max_length, cfg.lr, cfg.seed, cfg.resume) == ("m", ("x",), "o", 2, 3.0, 4, 5, 64, 0.01, 9, True)


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(SystemExit) as e:
        parse(SFTConfig, ["--config", str(cfg_file)])
    assert "learning_rate" in str(e.value) and str(cfg_file) in str(e.value)


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        parse(SFTConfig, ["--learning-rate", "0.1"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse(SFTConfig, ["--lr", "0.02", "--data", "a", "--data", "b"])
    save_config(cfg, tmp_path)
    again = parse(SFTConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again.lr == 0.02 and again.data == ("a", "b")


def _command_configs():
    import importlib

    from alignkit.cli import COMMANDS

    for name, (module, cls_name, _, _) in COMMANDS.items():
        yield name, getattr(importlib.import_module(module), cls_name)


def test_every_numeric_training_flag_has_a_range():
    import dataclasses

    from alignkit.config import LIMITS, RUN_ONLY_FIELDS, TrainConfig

    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", "tuple[float, float]")}
    assert numeric - set(LIMITS) == {"seed"}  # any integer is a seed
    assert RUN_ONLY_FIELDS <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field, value", [("batch_size", "0"), ("max_new_tokens", "0"), ("lr", "-1"),
                                          ("temperature", "-0.5"), ("top_p", "0")])
def test_every_command_validates_its_numeric_flags(field, value):
    import dataclasses

    from alignkit.errors import UserError

    checked = 0
    for name, cls in _command_configs():
        if field in {f.name for f in dataclasses.fields(cls)}:
            flag = "--" + field.replace("_", "-")
            with pytest.raises(UserError, match=f"^{flag} must be"):
                parse(cls, [flag, value])
            checked += 1
    assert checked >= 2
