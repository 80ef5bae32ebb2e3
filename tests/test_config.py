"""Configuration: strict parsing, overrides, recipes, and the CLI's one-line errors."""

import pytest
import yaml

from budgetlm.cli import build_parser, config_overrides, main
from budgetlm.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    list_recipes,
    load_config,
    load_recipe,
    save_config,
)
from budgetlm.errors import UserError


def test_overrides_parse_types():
    cfg = apply_overrides(RunConfig(), ["train.lr=3e-4", "model.n_layer=6", "model.tie_embeddings=false", "budget.limit=90m"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 6 and isinstance(cfg.model.n_layer, int)
    assert cfg.model.tie_embeddings is False
    assert cfg.budget.limit == "90m"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("modle.n_layer=2", "unknown config key 'modle.n_layer' (did you mean 'model.n_layer'?)"),
        ("model.n_layer=two", "config key 'model.n_layer': expected an integer"),
        ("model.n_layer=2.5", "config key 'model.n_layer': expected an integer"),
        ("model.tie_embeddings=maybe", "config key 'model.tie_embeddings': expected true or false"),
        ("train.lr=fast", "config key 'train.lr': expected a number"),
        ("model.objective=diffusion", "config key 'model.objective': 'diffusion' is not one of causal, masked"),
        ("model=3", "config key 'model' is a section"),
        ("train.lr", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        apply_overrides(RunConfig(), [override])
    assert message in str(e.value)


def test_from_dict_rejects_unknown_nested_key():
    with pytest.raises(UserError, match="unknown config key 'model.n_layerz'"):
        from_dict(RunConfig, {"model": {"n_layerz": 3}})
    assert from_dict(RunConfig, {"model": {"n_layers": 3}}).model.n_layer == 3  # an alias (Mistral's name) is no typo
    with pytest.raises(UserError, match="section 'model' must be a mapping"):
        from_dict(RunConfig, {"model": 3})


def test_round_trip_through_yaml(tmp_path):
    cfg = apply_overrides(load_recipe("gpt-124m-1gpu"), ["train.lr=5e-4", "data=/some/dir"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg


def test_builtin_recipes_load_and_differ_from_defaults():
    assert {"gpt-124m-1gpu", "bert-24h"} <= set(list_recipes())
    bert = load_recipe("bert-24h")
    assert bert.model.objective == "masked" and bert.model.n_layer == 16 and bert.model.seq_len == 128
    assert bert.model.mlp == "geglu" and bert.train.schedule == "one-cycle" and bert.train.batch_ramp == 0.6
    gpt = load_recipe("gpt-124m-1gpu")
    assert (gpt.model.n_layer, gpt.model.n_head, gpt.model.n_embd, gpt.model.seq_len) == (12, 12, 768, 1024)
    assert not gpt.auto and not bert.auto and RunConfig().auto  # a recipe is a complete configuration, the defaults plan


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"train": {"learning_rat": 1.0}}))
    with pytest.raises(UserError, match=r"unknown config key 'train.learning_rat' \(did you mean 'train.lr'\?\)"):
        load_recipe(str(typo))


def test_dotted_flags_and_set_both_apply_later_wins():
    args = build_parser().parse_args(["pretrain", "--train.lr", "0.1", "--set", "train.lr=0.2", "--model.n_layer", "3"])
    cfg = apply_overrides(RunConfig(), config_overrides(args))
    assert cfg.train.lr == pytest.approx(0.2) and cfg.model.n_layer == 3


def test_help_shows_field_meaning_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr" in out and "peak learning rate" in out and "(default: 0.001)" in out


def test_cli_config_error_is_one_line_exit_2(capsys, tmp_path):
    code = main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "train.lrr=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "unknown config key 'train.lrr'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "keys, match",
    [
        (["model.mlm_head=true"], "a causal model has none"),  # the head is the masked objective's
        (["model.objective=masked", "model.first_attention_norm=false"], "needs model.embed_norm=true"),
        (["model.objective=masked", "model.mlm_head=true", "parallel.tp=2"], "not supported with parallel.tp > 1"),
    ],
)
def test_modernbert_layout_options_are_checked_before_training(keys, match):
    from budgetlm.pretrain import check_config

    cfg = apply_overrides(RunConfig(auto=False), keys)
    with pytest.raises(UserError, match=match):
        check_config(cfg)
