"""Typed configuration: YAML defaults, CLI overrides, unknown keys rejected, shipped configs valid."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from train.checkpoint import save_checkpoint
from train.config import CONFIG_DIR, Config, ConfigError, load_config, save_config


def test_overrides_and_types(tmp_path):
    cfg = load_config(["--epochs", "3", "--lr=0.1", "--eval_splits", "val,test", "--progress", "false"])
    assert cfg.epochs == 3 and cfg.lr == 0.1 and cfg.eval_splits == ["val", "test"] and cfg.progress is False
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(["--epoch", "3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(["--epochs", "many"])


def test_yaml_then_cli_and_resume_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nmethod: ce\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml"), "--method", "mixup"])
    assert cfg.epochs == 7 and cfg.method == "mixup"
    save_checkpoint(tmp_path, {"model": {}, "epoch": 3, "config": dataclasses.asdict(cfg)}, 2, keep=2,
                    is_best=False)
    save_config(Config(method="ce", epochs=99), tmp_path / "config.yaml")  # a copy for people: not read
    again = load_config(["--resume", str(tmp_path), "--epochs", "9"])
    assert again.method == "mixup" and again.epochs == 9 and again.resume == str(tmp_path)
    (tmp_path / "last.pt").unlink()
    import shutil
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "selectmix").mkdir()
    (tmp_path / "selectmix" / "fold-0.npz").write_bytes(b"")  # a cross-validation stage under way: config.yaml
    assert load_config(["--resume", str(tmp_path)]).epochs == 99


def test_shipped_configs_parse_and_digits_matches_defaults():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"digits", "cifar10", "cifar100", "clothing1m", "webvision_mini"} <= names
    for name in names:
        load_config(["--config", str(CONFIG_DIR / f"{name}.yaml"), "--pretrained", "none"])
    digits = yaml.safe_load((CONFIG_DIR / "digits.yaml").read_text())
    defaults = dataclasses.asdict(Config())
    assert all(defaults[k] == v for k, v in digits.items())


def test_base_key_layers_a_config_over_another(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("epochs: 7\nlr: 0.5\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nlr: 0.1\n")
    cfg = load_config(["--config", str(tmp_path / "sub" / "b.yaml"), "--seed", "3"])
    assert (cfg.epochs, cfg.lr, cfg.seed) == (7, 0.1, 3)
    (tmp_path / "a.yaml").write_text("base: sub/b.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(["--config", str(tmp_path / "a.yaml")])


def test_settings_wrong_together_are_rejected():
    assert load_config(["--refresh_every", "3"]).refresh_every == 3
    with pytest.raises(ConfigError, match="needs full-pass epochs"):
        load_config(["--refresh_every", "2", "--num_batches", "10"])
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(["--refresh_every", "0"])
    with pytest.raises(ConfigError, match="auto, true, false"):
        load_config(["--cache_images", "yes"])
    assert load_config(["--method", "selectmix", "--guess", "online"]).guess == "online"
    with pytest.raises(ConfigError, match="--guess online works with --method mixnn"):
        load_config(["--method", "ce", "--guess", "online"])
    assert load_config(["--method", "select-correct", "--select_mixup", "true"]).select_mixup is True
    with pytest.raises(ConfigError, match="--select_mixup is a select-correct setting; it does nothing with --method mixnn"):
        load_config(["--method", "mixnn", "--select_mixup", "true"])
    assert load_config(["--gmm_split", "class", "--gmm_scale", "log"]).gmm_split == "class"
    with pytest.raises(ConfigError, match="--gmm_split must be one of auto, global, class"):
        load_config(["--gmm_split", "per-class"])


# The MixNN paper's protocol (Sec. V; CIFAR values also in the authors' released script), per shipped config.
CIFAR = dict(epochs=300, batch_size=128, lr=0.02, lr_min=0.001, restart_period=10, weight_decay=0.001,
             warmup_epochs=10, correction_epoch=59, ema=0.9, k=1, num_batches=0, model="cifar_resnet34")
PAPER = {
    "cifar10": CIFAR,
    "cifar100": {**CIFAR, "warmup_epochs": 30},
    "cifar10n": {**CIFAR, "data": "shards/cifar10n-worse"},  # base: cifar10.yaml
    "cifar100n": {**CIFAR, "warmup_epochs": 30, "data": "shards/cifar100n-noisy"},
    "clothing1m": dict(model="resnet50", correction_epoch=59, ema=0.9, k=1, weight_decay=0.001),
    "webvision_mini": dict(model="inception_resnet_v2", epochs=300, lr_min=0.001, restart_period=10, warmup_epochs=10,
                           correction_epoch=59, ema=0.9, k=1, image_size=227),
    # DivideMix (the authors' Train_cifar.py / Train_clothing1M.py / Train_webvision.py)
    "dividemix_cifar10": dict(method="dividemix", model="preact_resnet18", epochs=300, batch_size=64, lr=0.02,
                              lr_schedule="step", lr_steps=[150], lr_gamma=0.1, weight_decay=0.0005, warmup_epochs=10,
                              mixup_alpha=4, temperature=0.5, p_threshold=0.5, lambda_u=25, rampup_epochs=16),
    "dividemix_cifar100": dict(method="dividemix", model="preact_resnet18", epochs=300, warmup_epochs=30,
                               lambda_u=150, lr_steps=[150], mixup_alpha=4),
    "dividemix_clothing1m": dict(method="dividemix", model="resnet50", epochs=80, batch_size=32, num_batches=1000,
                                 lr=0.002, lr_steps=[40], weight_decay=0.001, warmup_epochs=1, warmup_penalty=True,
                                 mixup_alpha=0.5, lambda_u=0, select_split="val"),
    "dividemix_webvision_mini": dict(method="dividemix", model="inception_resnet_v2", pretrained="none", epochs=80,
                                     batch_size=32, lr=0.01, lr_steps=[40], weight_decay=0.0005, warmup_epochs=1,
                                     warmup_penalty=False, mixup_alpha=0.5, lambda_u=0),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shipped_configs_follow_the_paper(name):
    cfg = load_config(["--config", str(CONFIG_DIR / f"{name}.yaml"), "--pretrained", "none"])
    assert {k: getattr(cfg, k) for k in PAPER[name]} == PAPER[name]


def test_a_config_that_pretrains_requires_a_choice():
    with pytest.raises(ConfigError, match="--pretrained PATH .* --pretrained none"):
        load_config(["--config", str(CONFIG_DIR / "clothing1m.yaml")])
    assert load_config(["--config", str(CONFIG_DIR / "clothing1m.yaml"), "--pretrained", "none"]).pretrained == "none"
    fast = load_config(["--config", f"{CONFIG_DIR / 'webvision_mini.yaml'},{CONFIG_DIR / 'webvision_mini_fast.yaml'}"])
    assert fast.epochs == 100 and fast.model == "inception_resnet_v2"  # the named deviation layers over the paper's


def test_gmm_auto_resolves_per_method_and_explicit_values_win(tmp_path):
    gmm = lambda argv: (lambda c: (c.gmm_split, c.gmm_scale))(load_config(argv))
    assert gmm(["--method", "select-correct"]) == ("class", "log")
    assert gmm([]) == gmm(["--method", "dividemix"]) == gmm(["--method", "select"]) == ("global", "linear")  # MixNN
    assert gmm(["--gmm_split", "class"]) == ("class", "linear")
    assert gmm(["--config", f"{CONFIG_DIR}/fashion_mnist.yaml,{CONFIG_DIR}/mixnn_paper.yaml"]) == ("global", "linear")
    save_config(load_config(["--method", "select-correct"]), tmp_path / "config.yaml")  # the resolved values stay
    assert "gmm_split: class" in (tmp_path / "config.yaml").read_text()


def test_paper_method_configs_layer_over_a_data_set_config():
    both = lambda name: load_config(["--config", f"{CONFIG_DIR}/fashion_mnist.yaml,{CONFIG_DIR}/{name}.yaml"])
    selectmix = both("selectmix_paper")  # fashion_mnist.yaml's 3 x 8 cross-validation is overridden
    assert (selectmix.method, selectmix.selectmix_rule, selectmix.cv_folds, selectmix.cv_epochs) == \
        ("selectmix", "mismatch", 5, 15)
    assert (selectmix.model, selectmix.epochs) == ("small_cnn_w16", 20)  # the data set's settings stay
    assert load_config(["--method", "selectmix"]).selectmix_rule == "cleanlab"
    mixnn = both("mixnn_paper")
    assert (mixnn.gmm_loss_window, mixnn.neighbour_pool, mixnn.gmm_split) == (1, "all", "global")


def test_a_run_from_before_a_key_existed_resumes_on_that_keys_first_default(tmp_path):
    old = dataclasses.asdict(load_config(["--method", "mixnn"]))
    for key in ("gmm_split", "gmm_scale", "gmm_loss_window", "selectmix_rule"):  # added after this run was written
        del old[key]
    save_checkpoint(tmp_path, {"model": {}, "epoch": 1, "config": old}, 0, keep=2, is_best=False)
    resumed = load_config(["--resume", str(tmp_path)])
    assert (resumed.gmm_split, resumed.gmm_scale, resumed.gmm_loss_window) == ("global", "linear", 1)
    assert resumed.selectmix_rule == "mismatch"
    assert load_config(["--resume", str(tmp_path), "--gmm_split", "class"]).gmm_split == "class"  # still overridable
    today = dataclasses.asdict(load_config([]))
    save_checkpoint(tmp_path, {"model": {}, "epoch": 2, "config": today}, 1, keep=2, is_best=False)
    assert (load_config(["--resume", str(tmp_path)]).gmm_split, load_config([]).gmm_loss_window) == ("global", 5)


def test_mixnn_defaults_follow_the_authors_code_and_mixnn_global_is_the_papers_search(tmp_path):
    authors = load_config(["--config", f"{CONFIG_DIR}/digits.yaml,{CONFIG_DIR}/mixnn_authors.yaml"])
    default = load_config(["--config", f"{CONFIG_DIR}/digits.yaml"])
    differ = {f.name for f in dataclasses.fields(Config) if getattr(default, f.name) != getattr(authors, f.name)}
    # the optimiser stays the data set's; the GMM's losses are averaged over 5 refreshes at every noise rate;
    # digits mixes each sample with 2 neighbours
    assert differ == {"lr_min", "weight_decay", "gmm_loss_window", "k"}
    assert (default.k, authors.k, load_config([]).k) == (2, 1, 2)
    glob = load_config(["--config", f"{CONFIG_DIR}/digits.yaml,{CONFIG_DIR}/mixnn_global.yaml"])
    assert (glob.knn_scope, glob.batch_knn_mode, glob.target_update, glob.target_update_every, glob.mix_start,
            glob.early_loss, glob.gmm_split, glob.gmm_scale, glob.gmm_loss_window) == \
        ("global", "eval", "refresh", 1, "warmup", "ce", "class", "log", 5)
    assert glob.k == 1  # the paper's one neighbour
    # a global search alone keeps the other defaults; the in-batch-only ones fall back to what works with it
    alone = load_config(["--knn_scope", "global"])
    assert (alone.batch_knn_mode, alone.target_update, alone.early_loss, alone.target_update_every) == \
        ("eval", "refresh", "prob", 10)
    others = load_config(["--method", "selectmix"])
    assert (others.knn_scope, others.early_loss, others.target_update_every, others.gmm_loss) == \
        ("global", "ce", 1, "given")
    old = dataclasses.asdict(load_config(["--config", f"{CONFIG_DIR}/digits.yaml,{CONFIG_DIR}/mixnn_global.yaml"]))
    for key in ("knn_scope", "early_loss", "mix_start", "warmup_data", "target_update", "target_update_every",
                "batch_knn_mode", "gmm_loss", "gmm_window_scale"):  # a run written before these keys existed
        del old[key]
    save_checkpoint(tmp_path, {"model": {}, "epoch": 1, "config": old}, 0, keep=2, is_best=False)
    assert dataclasses.asdict(load_config(["--resume", str(tmp_path)])) == dataclasses.asdict(glob) | {
        "resume": str(tmp_path)}


def test_a_record_of_this_version_resumes_as_written_and_a_newer_one_is_refused(tmp_path):
    """RUN/config.yaml and the checkpoint record `config_version`; a record of the current version is taken
    as it is (no migration fills anything), one of a newer version is a clear error."""
    from train.config import CONFIG_VERSION, config_record, read_yaml, save_config, saved_settings

    cfg = load_config(["--method", "dividemix", "--lambda_u", "0"])
    save_config(cfg, tmp_path / "config.yaml")
    written = read_yaml(tmp_path / "config.yaml")
    assert written["config_version"] == CONFIG_VERSION and saved_settings(written) == {
        "noisymix_version": written["noisymix_version"], **dataclasses.asdict(cfg)}
    record = config_record(cfg)
    save_checkpoint(tmp_path, {"model": {}, "epoch": 1, "config": record}, 0, keep=2, is_best=False)
    assert dataclasses.asdict(load_config(["--resume", str(tmp_path)])) == dataclasses.asdict(cfg) | {
        "resume": str(tmp_path)}
    record["config_version"] = CONFIG_VERSION + 1
    save_checkpoint(tmp_path, {"model": {}, "epoch": 2, "config": record}, 1, keep=2, is_best=False)
    with pytest.raises(ConfigError, match="written by a newer version"):
        load_config(["--resume", str(tmp_path)])


def test_every_shipped_config_resolves_to_its_recorded_values():
    """Each launch/configs file alone resolves key for key to tests/train/resolved_configs.json (recorded
    from the code before the method interface moved the per-method defaults into the method classes; the
    keys added since, `epoch_cache` and `decode_draft`, at their defaults; the changes made on purpose since:
    E_s 9 (digits' and the built-in default), MixNN's GMM window 5 and digits' 2 neighbours (k 2, the built-in
    default's too; kept at 1 by fashion_mnist.yaml and mixnn_global.yaml) and webvision_mini.yaml's shuffled
    warm-up (`warmup_data: augmented`), see CHANGELOG.md)."""
    recorded = json.loads((Path(__file__).parent / "resolved_configs.json").read_text())
    assert sorted(recorded) == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    for name, values in recorded.items():
        resolved = dataclasses.asdict(load_config(["--config", str(CONFIG_DIR / name), "--pretrained", "none"]))
        assert resolved == values, name


def test_keys_by_section_in_yaml_and_on_the_command_line(tmp_path):
    """A key may be written flat, under its section in YAML, or dotted on the command line: the same value."""
    (tmp_path / "s.yaml").write_text("method: dividemix\ngmm:\n  clean_threshold: 0.7\ndividemix:\n"
                                     "  lambda_u: 3\noptimisation: {lr: 0.2}\nmodel: small_cnn\n")
    cfg = load_config(["--config", str(tmp_path / "s.yaml"), "--dividemix.p_threshold", "0.6", "--run.seed", "4"])
    assert (cfg.clean_threshold, cfg.lambda_u, cfg.lr, cfg.p_threshold, cfg.seed, cfg.model) == (
        0.7, 3.0, 0.2, 0.6, 4, "small_cnn")
    flat = load_config(["--method", "dividemix", "--clean_threshold", "0.7", "--lambda_u", "3", "--lr", "0.2",
                        "--p_threshold", "0.6", "--seed", "4"])
    assert dataclasses.asdict(cfg) == dataclasses.asdict(flat)
    with pytest.raises(ConfigError, match=r"gmm.lambda_u: no such key in section 'gmm'"):
        load_config(["--gmm.lambda_u", "3"])
    with pytest.raises(ConfigError, match=r"unknown section 'optimization'.*did you mean 'optimisation'"):
        load_config(["--optimization.lr", "0.1"])


def test_method_options_are_declared_by_their_method():
    """Config's fields are the general sections' plus each registered method's `options`; a key of one
    method's options given to another is an error, the check derived from those declarations."""
    from train.config import SECTIONS, all_sections, keys_of, section_of
    from train.methods import METHODS
    from train.methods.dividemix import DivideMixOptions

    declared = [key for cls in all_sections().values() for key in keys_of(cls)]
    assert declared == [f.name for f in dataclasses.fields(Config)] and len(set(declared)) == len(declared)
    assert section_of("lambda_u") is DivideMixOptions and DivideMixOptions in METHODS["dividemix"].options
    assert section_of("lr") in SECTIONS
    for name, method in METHODS.items():
        for cls in method.options:  # every method option is refused by every method that does not own it
            key, value = keys_of(cls)[0], "x"
            other = next(m for m in METHODS if cls not in METHODS[m].options)
            kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
            value = {"bool": "true", "float": "0.123", "int": "7"}.get(kind, cls.choices[key][-1]
                                                                      if key in getattr(cls, "choices", {}) else value)
            with pytest.raises(ConfigError, match=f"--{key} is a .*setting; it does nothing with --method {other}"):
                load_config(["--method", other, f"--{key}", value])


def test_a_version_2_record_resumes_decoding_in_full(tmp_path):
    """Runs recorded before reduced-size JPEG decoding existed resume decoding as they did (in full)."""
    record = dataclasses.asdict(load_config(["--dataset", "clothing1m"])) | {"config_version": 2}
    del record["decode_draft"], record["epoch_cache"]
    save_checkpoint(tmp_path, {"model": {}, "epoch": 1, "config": record}, 0, keep=2, is_best=False)
    resumed = load_config(["--resume", str(tmp_path)])
    assert (resumed.decode_draft, resumed.epoch_cache) == ("false", "auto")
    assert load_config(["--dataset", "clothing1m"]).decode_draft == "auto"
