"""One typed configuration: dataclass defaults (= the digits demo), YAML file, `--key value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs"


@dataclass
class DataSettings:
    """Data: the prepared shards and how they are read."""

    section: ClassVar[str] = "data"
    dataset: str = "digits"  # transform preset; digits is prepared on first use
    data: str = ""  # prepared shards folder (data.prepare --out); "" = shards/<dataset>-<noise>-s<noise_seed>
    train_split: str = "train"
    eval_splits: list = field(default_factory=lambda: ["val", "test"])
    select_split: str = ""  # split choosing the best checkpoint ("" = first eval split; noisy val by default)
    image_size: int = 0  # 0 = the data set preset
    workers: int = 0  # DataLoader worker processes per rank
    cache_images: str = "auto"  # decode every image once into memory: auto (when it fits cache_max_mb) | true | false
    cache_max_mb: int = 1024  # per process; digits ~0.1 MB, CIFAR-10 train ~150 MB, Clothing1M far beyond
    decode_draft: str = "auto"  # auto: under a preset that resizes first (clothing1m, webvision), decode a JPEG at
    #                             least twice the resize at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling; not
    #                             bit-exact: docs/data.md) | false: always decode in full
    epoch_cache: str = "auto"  # auto: a training split too large for cache_images, under a preset that resizes
    #                            first (clothing1m, webvision), is read through a node-shared cache of the epoch's
    #                            resized images (cache_max_mb per process, /dev/shm), each decoded once | false
    verify_crc: bool = False  # at start, also CRC-32 every shard against dataset.json (reads the data set once;
    #                           sizes, counts, ids and labels are always checked)


@dataclass
class DigitsSettings:
    """Preparing the built-in digits set (read only when its shards are made on first use)."""

    section: ClassVar[str] = "digits"
    noise: str = "symmetric:0.4"  # only for preparing the built-in digits set on first use
    noise_seed: int = 0
    val_fraction: float = 0.1  # only for preparing digits: a noisy val split carved out of train


@dataclass
class ModelSettings:
    """Model."""

    section: ClassVar[str] = "model"
    model: str = "small_cnn"
    pretrained: str = ""  # local weights file (never downloaded) | none (from scratch) | required (a config that
    #                        pretrains, as its paper does, refuses to start until --pretrained PATH or none is given)
    drop_rate: float = 0.0
    pretrained_strict: bool = True  # --pretrained weights must fit the model (all but the classifier, which a
    #                                 different class count re-initialises); false: load what fits, list the rest
    channels_last: bool = False  # NHWC conv weights (timm's --channels-last): faster on CPU (oneDNN) and on GPUs


@dataclass
class TrainingSettings:
    """Method, schedule and soft targets."""

    section: ClassVar[str] = "training"
    method: str = "mixnn"  # the method to train with, one registered in train.methods.METHODS
    warmup_epochs: int = 5
    correction_epoch: int = 9  # E_s: soft targets move by EMA from this 0-based epoch on (-1: never)
    # A key set to "auto" (a number: 0) takes the method's default (its class's `defaults`); for MixNN those follow
    # the MixNN authors' released code, chosen on the noisy val split (docs/benchmarks.md, "MixNN's default").
    target_update_every: int = 0  # from E_s, move the soft targets only in epochs whose 1-based count is a multiple
    #                               of N (the last epoch of each N-epoch restart cycle): 1 is the paper's Eq. 12
    #                               every epoch; the MixNN authors' code (MixNN's default) uses 10
    ema: float = 0.9
    target_source: str = "prediction"  # what the EMA moves t toward: prediction (Eq. 12, p) | refined
    #                                    (w y + (1 - w) p with w = P(clean), DivideMix's label refinement)
    sharpen: float = 1.0  # temperature T applied to p before it enters the targets (1: none; DivideMix 0.5)
    guess: str = "none"  # online: samples judged noisy (GMM; SelectMix: uncertain) train on the network's current
    #                      prediction of their un-mixed image, sharpened by `sharpen` (DivideMix's label guessing
    #                      with one network: one extra no-grad forward per step) | none: on their soft targets
    warmup_data: str = "auto"  # warm-up epochs train on: augmented (shuffled, train transform) | plain (un-augmented
    #                            images in sample-id order, the same every epoch: the MixNN authors' loader; MixNN's)
    prior_penalty: bool = False  # + KL(uniform || mean batch prediction) after warm-up (DivideMix's regulariser)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) of the mixing draws (0: the method's default: 1;
    #                           DivideMix 4, its authors' Train_cifar.py)
    targets_topk: int = 0  # 0: dense float16 soft targets; >0: keep the top-k classes per sample
    memorisation_every: int = 5  # methods without a refresh pass: measure memorisation every N epochs (0: never)


@dataclass
class GMMSettings:
    """Clean probabilities: the Gaussian mixture over per-sample losses."""

    section: ClassVar[str] = "gmm"
    gmm_loss: str = "auto"  # loss the GMM sees: given (against the given label) | corrected (argmax(t): MixNN)
    refresh_every: int = 1  # refresh tables every R epochs after warm-up (1: every epoch, the paper; needs num_batches 0)
    gmm_loss_window: int = 0  # fit the GMM on each sample's loss averaged over the last W refreshes (0: the method's
    #                           default: 5; MixNN and DivideMix 1, as their authors' scripts below 80% / 90% noise)
    gmm_window_scale: str = "auto"  # what the window averages: raw losses | normalised (each refresh's losses
    #                                 min-max scaled first: the MixNN and DivideMix authors' code, MixNN's default)
    gmm_split: str = "auto"  # global: one mixture over all samples (the papers) | class: one per label (the
    #                          label the loss is against), so each class gets its own split point | auto: the method's
    gmm_scale: str = "auto"  # the mixture is fit on min-max normalised losses (linear) or log-losses (log) | auto
    clean_threshold: float = 0.5  # P(clean) above which a sample counts as clean (select, pools, metrics)


@dataclass
class NeighbourSettings:
    """Neighbours in feature space."""

    section: ClassVar[str] = "neighbours"
    k: int = 2  # neighbours per sample (the digits demo's; data set configs set their own)
    metric: str = "l2"  # l2 | cosine
    knn_scope: str = "auto"  # global: the whole epoch set, the sharded index (paper) | batch: inside each mini-batch
    #                          (the authors' code, MixNN's default)
    neighbour_pool: str = "all"  # where neighbours are searched: all | clean (P(clean) > clean_threshold) | class
    #                              (clean samples of the anchor's corrected class)
    knn_index: str = "exact"  # exact | hnsw | ivf | clustered (approximate; recall@k vs exact is logged every epoch)
    knn_dim: int = 0  # >0: search on a PCA projection of the embeddings to this many dimensions (approximate;
    #                  cuts the search cost by d / knn_dim; recall@k against exact full-dimension search is logged)
    hnsw_m: int = 32
    hnsw_ef: int = 64
    ivf_nprobe: int = 8
    clustered_nprobe: int = 2  # knn_index clustered: lists searched per query group
    recall_queries: int = 1000  # sampled queries for the recall estimate of an approximate index
    embed_transfer: str = "float32"  # float16 halves the query blocks sent between ranks


@dataclass
class OptimSettings:
    """Optimisation. `batch_size` is the global batch (split evenly over the processes)."""

    section: ClassVar[str] = "optimisation"
    epochs: int = 60
    batch_size: int = 64
    num_batches: int = 0  # 0: full pass per epoch; >0: class-balanced draw of num_batches batches
    lr: float = 0.05
    lr_min: float = 1e-4
    lr_schedule: str = "cosine_restarts"  # cosine_restarts (MixNN) | step (lr x lr_gamma at each of lr_steps)
    restart_period: int = 10  # cosine annealing with warm restarts, in epochs
    lr_steps: list = field(default_factory=list)  # step schedule: epochs (0-based) at which lr is multiplied
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU | bf16 (CUDA or CPU autocast) | no (fp16 is
    #                                refused: it needs loss scaling, which the mixing losses are not tested with)


@dataclass
class RunSettings:
    """Run folder, seeds and logging."""

    section: ClassVar[str] = "run"
    seed: int = 0
    output: str = "runs"
    run_name: str = ""  # "" = <dataset>-<method>-<timestamp>
    resume: str = ""  # run folder to continue
    eval_every: int = 1
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class CrossValidationSettings:
    """Cross-validation: the K-fold stage before the first epoch of the methods with `cross_validation`."""

    section: ClassVar[str] = "cross_validation"
    cv_folds: int = 5  # folds of the stage (SelectMix, Confident Learning): each gives out-of-sample probabilities
    cv_epochs: int = 15  # epochs of each fold's model
    cv_best_epoch: bool = True  # keep each fold's predictions at its best held-out accuracy vs the given labels


# The general sections, in the order `--help` lists them; each method's own options are dataclasses in its file
# (a method class's `options`), added after these by `config_class`.
SECTIONS = (DataSettings, DigitsSettings, ModelSettings, TrainingSettings, GMMSettings, NeighbourSettings,
            CrossValidationSettings, OptimSettings, RunSettings)


def method_sections() -> list[type]:
    """The methods' own options dataclasses (each registered method class's `options`), in registry order."""
    return list(dict.fromkeys(cls for method in method_classes().values() for cls in method.options))


def keys_of(cls: type) -> list[str]:
    """A section dataclass's keys (its fields; `section`, `choices` and `ranges` are class variables)."""
    return [f.name for f in dataclasses.fields(cls)]


def all_sections() -> dict[str, type]:
    """section name -> its dataclass: the general sections, then the methods' options."""
    out = {}
    for cls in (*SECTIONS, *method_sections()):
        if out.setdefault(cls.section, cls) is not cls:
            raise TypeError(f"{cls.__name__}: section name {cls.section!r} is already {out[cls.section].__name__}'s")
    return out


_CONFIG_CLASSES: dict = {}  # the sections' classes -> Config built from them


def config_class() -> type:
    """`Config`: one flat dataclass holding every section's fields (`cfg.lr`, `cfg.p_threshold`), so a key is
    one name wherever it is written (YAML, `--key value`, RUN/config.yaml); built on first use, as the methods'
    options live in their files, which import this module."""
    sections = tuple(all_sections().values())  # a method registered later (a plugin) gets a Config with its options
    if sections not in _CONFIG_CLASSES:
        specs, owner = [], {}
        for cls in sections:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in owner:
                    raise TypeError(f"{cls.__name__}.{f.name}: the key is already {owner[f.name]}'s (keys are one "
                                    "namespace: YAML and --key value name them without their section)")
                owner[f.name] = cls.__name__
                specs.append((f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory)))
        config = dataclasses.make_dataclass(
            "Config", specs, namespace={"__doc__": "Every setting of a run: the fields of every section (SECTIONS "
                                                   "and the methods' options), flat."})
        config.__module__ = __name__
        _CONFIG_CLASSES[sections] = config
    return _CONFIG_CLASSES[sections]


def __getattr__(name: str):
    if name == "Config":  # `from train.config import Config`
        return config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def section_of(key: str) -> type:
    """The section dataclass that declares `key`."""
    for cls in all_sections().values():
        if key in keys_of(cls):
            return cls
    raise KeyError(key)


def options_of(cfg, cls: type):
    """One section of a configuration as its own typed dataclass (e.g. a method's options)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# Keys whose value "auto" (numbers: 0) means "the method's default": the general default here, a method's own in
# its class's `defaults` (train/methods/), resolved in this order (knn_scope before the BATCH_ONLY keys).
AUTO_DEFAULTS = {
    "gmm_split": "global", "gmm_scale": "linear", "mixup_alpha": 1.0, "gmm_loss_window": 5, "knn_scope": "global",
    "batch_knn_mode": "eval", "target_update": "refresh", "target_update_every": 1, "mix_start": "warmup",
    "early_loss": "ce", "warmup_data": "augmented", "gmm_loss": "given", "gmm_window_scale": "raw",
}
BATCH_ONLY = ("batch_knn_mode", "target_update")  # their method default needs knn_scope batch (else: the default)
# A run folder's config.yaml and every checkpoint record every key with its resolved value and the
# `config_version` of that record, so a resumed run keeps its settings whatever the defaults are today. A
# record of an older version is migrated step by step (MIGRATIONS: version -> function to the next one);
# whoever renames or removes a key, or adds one whose old behaviour is not today's default, bumps
# CONFIG_VERSION and adds that step.
CONFIG_VERSION = 3


def migrate_1_to_2(values: dict) -> dict:
    """Version 1 (records without `config_version`) lacked the keys added during its life; such a record was
    written before the key existed, and the key's first default is what that run did."""
    first = {"gmm_loss_window": 1, "gmm_split": "global", "gmm_scale": "linear", "selectmix_rule": "mismatch",
             "knn_scope": "global", "batch_knn_mode": "eval", "target_update": "refresh", "target_update_every": 1,
             "mix_start": "warmup", "early_loss": "ce", "warmup_data": "augmented", "gmm_loss": "given",
             "gmm_window_scale": "raw"}
    return {**{k: v for k, v in first.items() if k not in values}, **values}


def migrate_2_to_3(values: dict) -> dict:
    """Version 3 added `decode_draft` (reduced-size JPEG decoding, not bit-exact): a run recorded before it
    decoded in full. (`epoch_cache`, added with it, is exact: its default applies.)"""
    return {"decode_draft": "false", **values}


MIGRATIONS = {1: migrate_1_to_2, 2: migrate_2_to_3}


METADATA = ("noisymix_version", "config_version")  # written into RUN/config.yaml and checkpoints, not settings


class UserError(Exception):
    """A user's mistake (bad option, data not prepared, missing file): one `error:` line, exit 2, no traceback."""


class ConfigError(UserError, ValueError):
    """An unknown key or a value of the wrong type."""


def field_types() -> dict[str, type]:
    config = config_class()
    hints = typing.get_type_hints(config)
    return {f.name: hints[f.name] for f in dataclasses.fields(config)}


def convert(key: str, value, kind: type):
    """Coerce a YAML or command-line value to the field's type."""
    if kind is list:
        return value if isinstance(value, list) else [v for v in str(value).split(",") if v]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true/false, got {value!r}")
    try:
        return kind(value) if value is not None else kind()
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {kind.__name__}, got {value!r}") from None


def similar_keys(key: str, known: list[str]) -> list[str]:
    """Up to three known keys a mistyped one probably meant: a near-identical spelling, then those sharing its
    first word, then close spellings."""
    head = key.split("_")[0]
    same_head = [k for k in known if k == head or k.startswith(head + "_")]
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
    return list(dict.fromkeys(near + same_head + difflib.get_close_matches(key, known, n=3)))[:3]


def flat_values(values: dict, origin: str) -> dict:
    """Keys as one flat dict: a section written as a mapping (`gmm: {gmm_split: class}`) or a dotted key
    (`--gmm.gmm_split class`) is its keys, each checked to belong to that section; flat keys pass as they are."""
    sections, out = all_sections(), {}
    for key, value in values.items():
        key = key.replace("-", "_")
        head, dot, name = key.partition(".")
        if not dot and not (isinstance(value, dict) and key in sections):
            out[key] = value
            continue
        if head not in sections:
            close = difflib.get_close_matches(head, list(sections), n=1)
            raise ConfigError(f"{origin}: unknown section {head!r} (sections: {', '.join(sections)})"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        items = {name: value} if dot else value
        for sub, sub_value in items.items():
            sub = str(sub).replace("-", "_")
            known = keys_of(sections[head])
            if sub not in known:
                close = similar_keys(sub, known)
                raise ConfigError(f"{origin}: {head}.{sub}: no such key in section {head!r} (its keys: "
                                  f"{', '.join(known)})" + (f"; did you mean {' or '.join(map(repr, close))}?"
                                                           if close else ""))
            out[sub] = sub_value
    return out


def apply(cfg, values: dict, origin: str, given: set | None = None):
    """Set known keys (flat, or by section: `flat_values`), adding their names to `given`; unknown keys are an
    error naming the closest known one."""
    types = field_types()
    values = flat_values(values, origin)
    if given is not None:
        given |= set(values)
    for key, value in values.items():
        if key in METADATA:
            continue
        if key not in types:
            close = similar_keys(key, list(types))
            raise ConfigError(f"{origin}: unknown key {key!r}" +
                              (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        setattr(cfg, key, convert(key, value, types[key]))
    return cfg


class HelpRequested(Exception):
    """`--help` / `-h` on the command line: print `help_text()` and exit 0."""


def field_docs() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section title, [(key, comment)])] read from each section's dataclass source (its docstring's first
    line; a method's options also name the methods that read them), in `all_sections` order."""
    import inspect

    owners: dict = {}
    for name, method in method_classes().items():
        for cls in method.options:
            owners.setdefault(cls, []).append(name)
    out = []
    for cls in all_sections().values():
        title = (cls.__doc__ or cls.__name__).strip().split(". ")[0].rstrip(".")
        if cls in owners:
            title += f", --method {', '.join(owners[cls])}"
        keys, key, names = [], None, set(keys_of(cls))
        for line in inspect.getsource(cls).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                if stripped[1:].startswith("  ") and key is not None:  # continuation of the field above
                    keys[-1] = (key, f"{keys[-1][1]} {stripped[1:].strip()}")
                else:
                    key = None
            elif stripped.split(":", 1)[0] in names:
                key = stripped.split(":", 1)[0]
                keys.append((key, stripped.split("#", 1)[1].strip() if "#" in stripped else ""))
            else:
                key = None
        out.append((f"{title} [{cls.section}]", keys))
    return out


def help_text() -> str:
    """`train/main.py --help`: usage, the shipped config files, examples, then every key by section with its
    type, default and documentation."""
    import textwrap

    types, defaults = field_types(), dataclasses.asdict(config_class()())
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    lines = [
        "usage: accelerate launch train/main.py [--config FILE[,FILE...]] [--key value ...]",
        "       python train/main.py ...          (one process)",
        "",
        "Train an image classifier on noisily labelled data with MixNN, SelectMix, DivideMix or a baseline.",
        "With no arguments: MixNN on the built-in digits set with 40% symmetric label noise.",
        "Settings: the defaults below <- each --config file in order (later files override earlier ones) <-",
        "--key value (or --key=value). Lists: comma-separated. Booleans: true/false. A key may also be written",
        "with its [section]: --gmm.gmm_split class, or in YAML `gmm: {gmm_split: class}`.",
        "",
        f"config files shipped in {CONFIG_DIR}:",
        *textwrap.wrap(", ".join(shipped), 100, initial_indent="  ", subsequent_indent="  "),
        "",
        "examples:",
        "  accelerate launch train/main.py --method ce --epochs 20",
        "  accelerate launch --config_file launch/accelerate/cpu2.yaml train/main.py \\",
        "      --config launch/configs/fashion_mnist.yaml,launch/configs/mixnn_paper.yaml --data shards/fmnist",
        "  accelerate launch train/main.py --resume runs/digits-mixnn-20260101-120000",
    ]
    for section, keys in field_docs():
        lines += ["", f"{section}:"]
        for key, doc in keys:
            kind = types[key].__name__ if isinstance(types[key], type) else str(types[key])
            default = defaults[key]
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default).lower() \
                if isinstance(default, bool) else repr(default) if default == "" else str(default)
            lines.append(f"  --{key} {kind.upper()}  (default: {shown})")
            if key == "method":
                doc = f"{doc}: {', '.join(method_classes())}"
            lines += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ") if doc else []
    return "\n".join(lines) + "\n"


def parse_overrides(argv: list[str]) -> dict:
    """`--key value` pairs (and `--key=value`) into a dict."""
    if "-h" in argv or "--help" in argv:
        raise HelpRequested
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out[key] = value
    return out


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file's values; `base: FILE` (relative to the file's folder) is read first and overridden."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (shipped configs: {CONFIG_DIR})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); a config file holds "
                          "`key: value` lines") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected `key: value` lines")
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"config file {path}: `base: {base}` includes itself")
    return {**read_yaml(base_path, (*seen, path.resolve())), **values}


def load_config(argv: list[str]):
    """Defaults <- `--config FILE[,FILE...]` in order (or the resumed run's config.yaml) <- `--key value`.

    Several files layer, e.g. `--config launch/configs/fashion_mnist.yaml,launch/configs/mixnn_paper.yaml`:
    the data set's settings, then the paper's method settings over them."""
    overrides, given = parse_overrides(argv), set()
    cfg = config_class()()
    if "resume" in overrides:
        apply(cfg, resumed_settings(Path(overrides["resume"])), "resumed run")
    for config_file in filter(None, overrides.pop("config", "").split(",")):
        apply(cfg, read_yaml(Path(config_file)), config_file, given)
    return check(apply(cfg, overrides, "command line", given), given)


# (test, what it must be) per numeric key of the general sections, and the allowed values of their string keys:
# checked before any work is done (a method's options declare theirs as the class's `ranges` / `choices`)
RANGES = {
    "epochs": (lambda v: v >= 1, ">= 1"), "batch_size": (lambda v: v >= 1, ">= 1"),
    "num_batches": (lambda v: v >= 0, ">= 0 (0: full passes)"), "lr": (lambda v: v > 0, "> 0"),
    "lr_min": (lambda v: v >= 0, ">= 0"), "restart_period": (lambda v: v >= 1, ">= 1 epoch"),
    "lr_gamma": (lambda v: v > 0, "> 0"), "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"), "eval_every": (lambda v: v >= 1, ">= 1"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1 (the newest epoch checkpoint is what a resume needs)"),
    "workers": (lambda v: v >= 0, ">= 0"), "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "correction_epoch": (lambda v: v >= -1, ">= 0, or -1 (never)"),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1) (to keep the targets fixed: --correction_epoch -1)"),
    "k": (lambda v: v >= 1, ">= 1"), "refresh_every": (lambda v: v >= 1, ">= 1"),
    "target_update_every": (lambda v: v >= 0, ">= 1 epoch, or 0 (the method's default)"),
    "gmm_loss_window": (lambda v: v >= 0, ">= 1, or 0 (the method's default)"), "clean_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "memorisation_every": (lambda v: v >= 0, ">= 0 (0: never)"), "mixup_alpha": (lambda v: v >= 0, "> 0, or 0 (the method's default)"),
    "knn_dim": (lambda v: v >= 0, ">= 0 (0: search the full embeddings)"), "hnsw_m": (lambda v: v >= 2, ">= 2"),
    "hnsw_ef": (lambda v: v >= 1, ">= 1"), "ivf_nprobe": (lambda v: v >= 1, ">= 1"),
    "clustered_nprobe": (lambda v: v >= 1, ">= 1"), "recall_queries": (lambda v: v >= 1, ">= 1"),
    "sharpen": (lambda v: v > 0, "> 0"), "cv_folds": (lambda v: v >= 2, ">= 2"), "cv_epochs": (lambda v: v >= 1, ">= 1"),
    "targets_topk": (lambda v: v >= 0, ">= 0 (0: dense targets)"), "image_size": (lambda v: v >= 0, ">= 0 (0: preset)"),
    "cache_max_mb": (lambda v: v >= 0, ">= 0"), "drop_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1) (0: no val split)"),
}
CHOICES = {
    "neighbour_pool": ("all", "clean", "class"),
    "target_source": ("prediction", "refined"), "guess": ("none", "online"), "gmm_loss": ("auto", "given", "corrected"),
    "gmm_split": ("auto", "global", "class"), "gmm_scale": ("auto", "linear", "log"),
    "lr_schedule": ("cosine_restarts", "step"),
    "cache_images": ("auto", "true", "false"), "epoch_cache": ("auto", "false"), "decode_draft": ("auto", "false"), "metric": ("l2", "cosine"), "knn_scope": ("auto", "global", "batch"),
    "gmm_window_scale": ("auto", "raw", "normalised"), "warmup_data": ("auto", "augmented", "plain"),
    "knn_index": ("exact", "hnsw", "ivf", "clustered"), "embed_transfer": ("float32", "float16"),
    "mixed_precision": ("auto", "bf16", "no"),
}


def method_classes() -> dict:
    """The registered methods, name -> class (train.methods.METHODS; imported on use, as the methods' modules
    import this one)."""
    from .methods import METHODS

    return METHODS


def check_values(cfg) -> None:
    """Every key against its choices and range (before any work: a typo never costs a warm-up)."""
    methods = list(method_classes())
    if cfg.method not in methods:
        close = difflib.get_close_matches(str(cfg.method), methods, n=1)
        raise ConfigError(f"--method must be one of {', '.join(methods)}, got {cfg.method!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if cfg.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16 is not supported (it needs loss scaling); use bf16 (CUDA "
                          "autocast, or CPU autocast) or no")
    choices, ranges = dict(CHOICES), dict(RANGES)
    for cls in method_sections():  # a method's options declare their own choices and ranges
        choices.update(getattr(cls, "choices", {}))
        ranges.update(getattr(cls, "ranges", {}))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            close = difflib.get_close_matches(str(getattr(cfg, key)), allowed, n=1)
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, (ok, what) in ranges.items():
        value = getattr(cfg, key)
        if value != value or not ok(value):  # NaN fails every range
            raise ConfigError(f"--{key} must be {what}, got {value!r}")
    if any(not isinstance(s, int) and not str(s).lstrip("-").isdigit() or int(s) < 0 for s in cfg.lr_steps):
        raise ConfigError(f"--lr_steps must be epochs (integers >= 0), got {cfg.lr_steps!r}")
    cfg.lr_steps = [int(s) for s in cfg.lr_steps]
    if cfg.select_split and cfg.select_split not in cfg.eval_splits:
        raise ConfigError(f"--select_split {cfg.select_split!r} is not one of --eval_splits {cfg.eval_splits}")
    if cfg.run_name and (cfg.run_name in (".", "..") or "/" in cfg.run_name):
        raise ConfigError(f"--run_name {cfg.run_name!r} must be a plain folder name (use --output for the parent)")
    from data.noise import parse_noise  # data knows nothing of train; the check borrows its parser
    try:
        parse_noise(cfg.noise)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from .models import check_model_name  # models import this module
    check_model_name(cfg.model)


def resolve_auto(cfg):
    """The AUTO_DEFAULTS keys left at auto / 0 set to the method's values (in order: knn_scope before the
    BATCH_ONLY keys)."""
    for key, default in AUTO_DEFAULTS.items():
        setattr(cfg, key, type(default)(method_default(cfg, key)))
    return cfg


def check_ownership(cfg, given: set | None = None) -> None:
    """A key of another method's options (train/methods/, a class's `options`) set to anything but what the
    chosen method runs with anyway is an error: it would do nothing. `given`: the keys a config file or the
    command line set (None: every key; a resumed run's record holds every key, as it ran)."""
    classes = method_classes()
    mine = {key for cls in classes[cfg.method].options for key in keys_of(cls)}
    baseline = resolve_auto(config_class()(method=cfg.method))
    for cls in method_sections():
        for key in keys_of(cls):
            if key not in mine and (given is None or key in given) and getattr(cfg, key) != getattr(baseline, key):
                owners = [m.title or m.name for m in classes.values() if cls in m.options]
                raise ConfigError(f"--{key} is a {' / '.join(owners)} setting; it does nothing with --method "
                                  f"{cfg.method}")


def check(cfg, given: set | None = None):
    """Values outside their choices and ranges, and settings that are wrong together (here, and the method's
    own `check_config`); the AUTO_DEFAULTS keys left at auto / 0 resolved for the method (what RUN/config.yaml
    then records)."""
    check_values(cfg)
    resolve_auto(cfg)
    check_ownership(cfg, given)
    classes = method_classes()
    guessing = [name for name, cls in classes.items() if cls.guesses]
    if cfg.guess != "none" and cfg.method not in guessing:
        raise ConfigError(f"--guess {cfg.guess} works with --method {', '.join(guessing)}, not {cfg.method}")
    classes[cfg.method].check_config(cfg)
    if cfg.pretrained == "required":
        raise ConfigError(f"{cfg.model} for {cfg.dataset} starts from ImageNet weights, as the paper does: pass "
                          "--pretrained PATH (a local .pth or .safetensors file; nothing is downloaded), or "
                          "--pretrained none to train from scratch on purpose")
    if cfg.refresh_every > 1 and cfg.num_batches > 0:
        raise ConfigError("--refresh_every > 1 needs full-pass epochs (num_batches 0): a class-balanced draw "
                          "changes the epoch's samples, and those outside the last refresh would have no neighbours")
    return cfg


def method_default(cfg, key: str):
    """An AUTO_DEFAULTS key's value, resolved for the method (its class's `defaults`) when left at auto / 0 (also
    for a Config built in code that never went through `check`)."""
    value = getattr(cfg, key)
    if value not in (0, "auto"):
        return value
    default = AUTO_DEFAULTS[key]
    if key in BATCH_ONLY and method_default(cfg, "knn_scope") != "batch":
        return default
    cls = method_classes().get(cfg.method)
    return cls.defaults.get(key, default) if cls is not None else default


def gmm_setting(cfg) -> tuple[str, str]:
    """(gmm_split, gmm_scale) with `auto` resolved for the method (`method_default`)."""
    return method_default(cfg, "gmm_split"), method_default(cfg, "gmm_scale")


def saved_settings(values: dict) -> dict:
    """A saved run's settings as it ran them: its record migrated from its `config_version` (none: 1) to
    CONFIG_VERSION (MIGRATIONS)."""
    values = dict(values)
    version = int(values.pop("config_version", 1))
    if version > CONFIG_VERSION:
        raise ConfigError(f"the run's settings were written by a newer version (config_version {version}; this "
                          f"one reads up to {CONFIG_VERSION}): resume it with that version")
    for step in range(version, CONFIG_VERSION):
        values = MIGRATIONS[step](values)
    return values


def config_record(cfg) -> dict:
    """What RUN/config.yaml and a checkpoint record of the settings: every key and the record's version."""
    return {"config_version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def resumed_settings(run_dir: Path) -> dict:
    """A resumed run's settings: those saved in the checkpoint it resumes from (RUN/config.yaml is a copy for
    people), else config.yaml (a run stopped in its cross-validation stage, before its first checkpoint)."""
    from .checkpoint import load_resume_checkpoint  # checkpoint imports this module

    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run folder")
    found = load_resume_checkpoint(run_dir, mmap=True, warn=False)
    if found is not None:
        return saved_settings(found[1]["config"])
    path = run_dir / "config.yaml"
    if not path.is_file() or not any((run_dir / "selectmix").glob("fold-*")):
        raise ConfigError(f"--resume {run_dir}: no checkpoint there (last.pt is missing); name the run folder of "
                          "an interrupted run, or drop --resume to start a new one")
    values = read_yaml(path)
    if "method" not in values:
        raise ConfigError(f"{path}: empty or incomplete (no `method`), and the run has no checkpoint to take its "
                          "settings from; start the run again")
    return saved_settings(values)


def config_of_checkpoint(state: dict):
    """The run's configuration as saved in a checkpoint (keys this version no longer knows are dropped, keys it
    did not know yet take their first default)."""
    config = config_class()
    return config(**{k: v for k, v in saved_settings(state["config"]).items() if k in config.__dataclass_fields__})


def save_config(cfg, path: Path) -> None:
    """Write the resolved configuration (`config.yaml` in the run folder, atomically) so the run can be
    repeated."""
    from data.atomic import atomic_write_text

    from .version import __version__

    atomic_write_text(path, yaml.safe_dump({"noisymix_version": __version__, **config_record(cfg)}, sort_keys=False))
