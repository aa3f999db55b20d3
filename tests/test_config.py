import pytest

from mambadm.config import ConfigError, EnvSpec, RunConfig, from_yaml_text, load_config, to_yaml


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["model.d_model=64", "optim.betas=[0.9,0.99]", "data.context_len=8"])
    assert cfg.model.d_model == 64
    assert list(cfg.optim.betas) == [0.9, 0.99]
    assert cfg.data.context_len == 8
    assert cfg.train.steps == RunConfig().train.steps


def test_yaml_include_and_precedence(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 5\n  d_model: 96\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\nmodel:\n  d_model: 32\n")
    cfg = load_config(tmp_path / "run.yaml", ["model.n_layer=2"])
    assert cfg.model.d_model == 32 and cfg.model.n_layer == 2


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  d_modle: 32\n")
    with pytest.raises(ConfigError, match="d_modle"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="nope"):
        load_config(None, ["train.nope=1"])


def test_bad_type_and_choice():
    with pytest.raises(ConfigError, match="d_model"):
        load_config(None, ["model.d_model=abc"])
    with pytest.raises(ConfigError, match="fusion"):
        load_config(None, ["model.fusion=multiply"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.d_model"])


def test_a_bare_no_is_the_choice_no_not_false(tmp_path):
    """YAML reads `no` as false; train.mixed_precision=no (Accelerate's name for full precision) still means 'no'."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "run.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "run.yaml").train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no preset"):
        load_config(None, ["model.size=galactic"])


def test_saved_yaml_round_trips():
    cfg = load_config(None, ["model.fusion=gate", "train.steps=7"])
    again = from_yaml_text(to_yaml(cfg))
    assert again == cfg


def test_preset_sits_under_the_layer_that_chose_it(tmp_path):
    from mambadm.config import preset_path
    from omegaconf import OmegaConf
    preset = OmegaConf.load(preset_path("mambadm", "m"))
    (tmp_path / "run.yaml").write_text("model:\n  d_model: 8\n  n_layer: 1\n")
    chosen_on_cli = load_config(tmp_path / "run.yaml", ["model.size=m"])
    assert chosen_on_cli.model.d_model == preset.d_model and chosen_on_cli.model.n_layer == preset.n_layer
    assert load_config(tmp_path / "run.yaml", ["model.size=m", "model.d_model=24"]).model.d_model == 24
    (tmp_path / "sized.yaml").write_text("model:\n  size: m\n  d_model: 8\n")
    chosen_in_yaml = load_config(tmp_path / "sized.yaml")
    assert chosen_in_yaml.model.d_model == 8 and chosen_in_yaml.model.n_layer == preset.n_layer


def test_choice_lists_come_from_the_code_that_implements_them():
    from mambadm.config import choices
    from mambadm.model.gloma import FUSIONS
    from mambadm.ssm.backends import BACKENDS

    assert choices()["model.fusion"] == tuple(FUSIONS) and choices()["model.backend"] == tuple(BACKENDS)
    for fusion in FUSIONS:
        assert load_config(None, [f"model.fusion={fusion}"]).model.fusion == fusion
    with pytest.raises(ConfigError, match=r"model.backend.*'warp'"):
        load_config(None, ["model.backend=warp"])


def test_env_spec_from_dict_round_trips_and_names_what_is_missing():
    import json

    spec = EnvSpec(obs_kind="vector", obs_shape=[11], act_dim=3, discrete=False, max_timestep=1000)
    assert EnvSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    as_index = {"obs_kind": "atari", "obs_shape": (4, 84, 84), "act_dim": "18", "discrete": 1, "max_timestep": 4096,
                "later_field": "ignored"}  # index.json may carry keys a spec does not use
    typed = EnvSpec.from_dict(as_index)
    assert typed == EnvSpec("atari", [4, 84, 84], 18, True, 4096) and isinstance(typed.obs_shape, list)
    partial = {k: v for k, v in spec.to_dict().items() if k != "act_dim"}
    with pytest.raises(ConfigError, match=r"shards/index.json: missing key\(s\) \['act_dim'\]"):
        EnvSpec.from_dict(partial, "shards/index.json")
    with pytest.raises(ConfigError, match="act_dim: int.*'three'"):
        EnvSpec.from_dict(spec.to_dict() | {"act_dim": "three"}, "env_spec.json")
    with pytest.raises(ConfigError, match="expected a mapping"):
        EnvSpec.from_dict(None, "env_spec.json")
