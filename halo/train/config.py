"""The typed config of ``halo-train`` / ``halo-submit``: one dataclass per config group.

The dataclasses are registered in Hydra's ``ConfigStore`` as ``halo_schema`` and come first in
``conf/config.yaml``'s defaults list, so every YAML file in ``conf/`` only chooses and
overrides: a value of the wrong type (``train.epochs=three``) or an unknown key
(``train.epoch=3``) is refused by Hydra when it composes, naming the key, before anything runs.
Each field is documented in one line (``metadata["doc"]``). Values that must be one of a few
names are strings, checked by :func:`check` at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

__all__ = [
    "ModelConfig", "HeadConfig", "TissueConfig", "AugmentConfig", "ColumnsConfig", "DataConfig", "MeshConfig",
    "TrainConfig", "DistConfig", "LauncherConfig", "Config", "SCHEMAS", "CHOICES", "check", "tissue_options",
    "augment_options", "columns_map", "register",
]


def doc(text: str, default: Any = MISSING, factory: Any = None) -> Any:
    """A dataclass field with its one-line documentation."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    name: str = doc("a torchvision classification model, timm:<name>, or halo_tiny[_WIDTH]", "halo_tiny")
    num_classes: int = doc("classes of the slide label (data.classes names them)", 2)
    weights: Optional[str] = doc("a state-dict path of the backbone (timm or torchvision keys), or a halo "
                                 "checkpoint (best.pt / last.pt: a warm start, trunk and head, or the trunk only "
                                 "where the head or classes differ); nothing is downloaded", None)


@dataclass
class HeadConfig:
    name: str = doc("slide head: max, mean, attention (gated, Ilse et al. 2018) or topk (Courtiol et al. 2018)", "max")
    options: dict[str, Any] = doc("keyword arguments of the head's class (halo.nn.heads)", factory=dict)


@dataclass
class TissueConfig:
    enabled: bool = doc("find the tissue on a thumbnail and read only its bounding box", True)
    thumb_size: int = doc("longest side of the thumbnail tissue is found on, pixels", 1024)
    floor: float = doc("saturation threshold ceiling in [0, 1]: the threshold is min(otsu, floor)", 8 / 255)
    min_object_fraction: float = doc("tissue objects smaller than this fraction of the thumbnail are dropped", 1e-4)
    margin: float = doc("margin around the tissue box, as a fraction of the slide's longer side", 0.02)


@dataclass
class AugmentConfig:
    enabled: bool = doc("augment training blocks (drawn alike on every rank of an image)", True)
    flips: bool = doc("a left-right flip with probability 1/2", True)
    rot90: bool = doc("0-3 quarter turns, uniformly", True)
    hed_sigma: float = doc("stain scale from U(1 - hed_sigma, 1 + hed_sigma) per stain (HED space)", 0.05)
    hed_bias: float = doc("stain shift from U(-hed_bias, hed_bias) per stain", 0.01)
    brightness: float = doc("brightness shift from U(-brightness, brightness), a fraction of 255", 0.05)
    contrast: float = doc("contrast factor from U(1 - contrast, 1 + contrast)", 0.1)


@dataclass
class ColumnsConfig:
    """The CSV header read as each column (null: by its name, or an alias in halo.data.ALIASES)."""

    slide: Optional[str] = doc("the slide's path or id (aliases: slide, slide path, slide file, path, file)", None)
    label: Optional[str] = doc("its class (aliases: label, class, diagnosis)", None)
    split: Optional[str] = doc("train, val or test", None)
    patient: Optional[str] = doc("keeps a patient's slides in one split (aliases: patient, patient id, case, "
                                 "case id, subject, subject id)", None)
    mpp: Optional[str] = doc("the slide's level-0 microns per pixel", None)
    level: Optional[str] = doc("the pyramid level to read it at", None)
    mask: Optional[str] = doc("a ground-truth mask image", None)
    slide_id: Optional[str] = doc("the slide's key (alias: slide id)", None)


def columns_map(data: DictConfig) -> dict[str, str]:
    """``data.columns`` as :class:`halo.data.SlideDataset`'s ``columns``: the headers given."""
    cols = data.get("columns") or {}
    return {k: str(cols[k]) for k in cols if cols[k] is not None}


@dataclass
class DataConfig:
    kind: str = doc("synthetic (the embedded cohort, generated on first use) or csv (your slides)", "synthetic")
    root: Optional[str] = doc("directory relative slide paths are resolved against (null: the CSV's)", None)
    csv: str = doc("the cohort CSV (, ; tab or | delimited): slide, label, optional split, patient, slide_id, mpp, "
                   "level, mask; headers matched ignoring case, spaces and _ (aliases: halo.data.ALIASES)")
    classes: list[str] = doc("class names; a label is a name or an index into this list")
    slides: int = doc("synthetic only: slides in the generated cohort", 40)
    seed: int = doc("synthetic only: seed of the generated cohort", 0)
    mpp: Optional[float] = doc("microns per pixel to train at (the matching level, or the next finer resampled)", None)
    level: Optional[int] = doc("pyramid level for slides without a usable mpp (or all, with mpp null)", None)
    strict: bool = doc("a slide unreadable mid-run stops the run (true) or is skipped and recorded (false)", False)
    skip_unreadable: bool = doc("train: a missing or unreadable slide found by the start-up check is skipped and "
                                "recorded in skipped_slides.csv (true) instead of refusing the run (false); "
                                "mode=predict always skips them", False)
    columns: ColumnsConfig = doc("your CSV's headers, where not read by name or alias (halo.data.ALIASES), e.g. "
                                 "data.columns.patient=MRN 'data.columns.label=Final Dx'", factory=ColumnsConfig)
    val_fraction: float = doc("no split column: this fraction of each class's patients is validation", 0.25)
    split_seed: int = doc("seed of that split", 0)
    stain_normalize: bool = doc("Macenko-normalise every block with stains fitted on the slide's thumbnail", False)
    canvas: int = doc("pad regions to multiples of this too (0: what the mesh needs); the same on meshes it fits", 0)
    tissue: TissueConfig = doc("tissue detection (halo.data.TissueOptions)", factory=TissueConfig)
    augment: AugmentConfig = doc("training augmentation (halo.data.Augment)", factory=AugmentConfig)


@dataclass
class MeshConfig:
    rows: int = doc("ranks sharing one image, along its height", 2)
    cols: int = doc("ranks sharing one image, along its width", 1)


@dataclass
class TrainConfig:
    """Optimisation and checkpoints.

    ``checkpoints/best.pt`` is the epoch of the highest validation AUC; among epochs of equal AUC,
    the lowest validation loss (``val_loss``: cross-entropy of the predicted probabilities), then
    the later epoch. Without validation slides, or with one class (no AUC), it is the last epoch.
    A run resumes (``resume``) only into its own schedule; to train on under another schedule or
    length, start a new run with ``model.weights=<run>/checkpoints/last.pt``.
    """

    epochs: int = doc("passes over the training slides", 8)
    lr: float = doc("peak learning rate of the head (the trunk's: lr * trunk_lr_scale)", 2e-3)
    optimizer: str = doc("adamw or sgd", "adamw")
    momentum: float = doc("sgd only: momentum", 0.9)
    weight_decay: float = doc("decoupled (adamw) or L2 (sgd) weight decay", 1e-4)
    schedule: str = doc("onecycle, cosine or constant, stepped per optimizer step", "onecycle")
    warmup_fraction: float = doc("onecycle only: fraction of the steps spent warming up", 0.1)
    accumulate: int = doc("slides per optimizer step, per image group", 1)
    class_weights: bool = doc("weigh the loss by inverse class frequency", True)
    seed: int = doc("seed of the initial weights, the slide order and the augmentation", 0)
    resume: bool = doc("continue from checkpoints/last.pt of the run directory (same schedule, epochs, world size and "
                       "accumulation; constant schedules may add epochs)", False)
    overwrite: bool = doc("train into a directory that holds checkpoints: remove its results first", False)
    bf16: bool = doc("autocast to bfloat16 on CUDA (ignored on CPU)", True)
    checkpointing: bool = doc("recompute each trainable trunk stage in backward (less memory)", False)
    freeze_bn: bool = doc("keep batch-norm statistics fixed (eval-mode BN)", False)
    trunk: str = doc("train, or frozen (eval mode, no gradients: only the head trains)", "train")
    freeze_stages: int = doc("the first N trunk stages frozen (with trunk=train)", 0)
    unfreeze_at: Optional[int] = doc("epoch (1-based) from which the frozen stages train too; DDP is rebuilt", None)
    trunk_lr_scale: float = doc("trunk learning rate relative to the head's", 1.0)
    heatmaps: bool = doc("write heatmaps/<key>.png of every validation, test and predicted slide", True)
    progress: bool = doc("show progress on rank 0: bars on a terminal, else a log line every progress_every_s", True)
    progress_bars: Optional[bool] = doc("null: tqdm bars only when stderr is a terminal (not in a SLURM .out file); "
                                        "true: bars always; false: plain log lines always", None)
    progress_every_s: float = doc("without bars: a progress line at most this often, seconds (and one per pass at "
                                  "its end)", 30.0)
    threads: Optional[int] = doc("torch threads per rank (null: cores / ranks on this node)", None)


@dataclass
class DistConfig:
    backend: str = doc("auto (nccl with CUDA, else gloo), nccl or gloo", "auto")
    timeout_s: float = doc("how long a rank waits for a lost peer before the job exits non-zero", 300.0)


@dataclass
class LauncherConfig:
    name: str = doc("local (processes here, through submitit) or slurm (an sbatch job)", "local")
    nodes: int = doc("slurm: nodes", 1)
    tasks_per_node: int = doc("ranks per node: one per GPU", 2)
    gpus_per_node: int = doc("GPUs per node (0: a CPU job)", 0)
    cpus_per_task: int = doc("slurm: CPUs per rank, also its OMP_NUM_THREADS", 8)
    partition: Optional[str] = doc("slurm: partition (null: the cluster's default)", None)
    timeout_min: int = doc("the job's time limit, minutes", 1440)
    mem: Optional[str] = doc("slurm: --mem, e.g. 64G (null: the partition's default)", None)
    account: Optional[str] = doc("slurm: --account", None)
    qos: Optional[str] = doc("slurm: --qos", None)
    constraint: Optional[str] = doc("slurm: --constraint", None)
    job_name: str = doc("slurm: the job's name", "halo")
    signal_delay_s: int = doc("seconds between the requeue signal and the kill at the time limit", 60)
    max_requeues: int = doc("time-outs and preemptions that requeue the job (it resumes from last.pt)", 3)
    srun_args: list[str] = doc("slurm: extra srun arguments", factory=lambda: ["--kill-on-bad-exit=1"])
    additional_parameters: dict[str, Any] = doc("slurm: any other sbatch option", factory=dict)
    setup: list[str] = doc("slurm: shell lines run before srun (module load ...)", factory=list)
    python: Optional[str] = doc("slurm: the interpreter on the nodes (null: this one)", None)
    follow: bool = doc("halo-submit copies rank 0's log to its stdout while it waits", True)
    poll_s: float = doc("how often halo-submit checks the job, seconds", 2.0)
    check_request: bool = doc("slurm: refuse, before submitting, a request no node of the partition can hold", True)
    status_every_s: float = doc("slurm: while pending, repeat the job's state and reason this often", 60.0)


@dataclass
class Config:
    model: ModelConfig = doc("the backbone (conf/model)", factory=ModelConfig)
    head: HeadConfig = doc("the slide head (conf/head)", factory=HeadConfig)
    data: DataConfig = doc("the cohort and how it is read (conf/data)", factory=DataConfig)
    mesh: MeshConfig = doc("ranks per image (conf/mesh)", factory=MeshConfig)
    train: TrainConfig = doc("optimisation, checkpoints, trunk modes (conf/train)", factory=TrainConfig)
    dist: DistConfig = doc("torch.distributed (conf/dist)", factory=DistConfig)
    launcher: LauncherConfig = doc("halo-submit's job (conf/launcher)", factory=LauncherConfig)
    mode: str = doc("train or predict", "train")
    checkpoint: Optional[str] = doc("predict: the checkpoint (best.pt / last.pt) to load; its model, head, classes "
                                    "and reading resolution are used unless given", None)
    blocks: list[int] = doc("predict: [rows, cols] blocks per slide, run one at a time by one rank (eval mode: every "
                            "layer is local), as a rows x cols mesh predicts it, on any number of devices; []: the mesh",
                            factory=list)
    run_dir: Optional[str] = doc("the run directory when not under @hydra.main (tests); else hydra.run.dir", None)


SCHEMAS = (ModelConfig, HeadConfig, TissueConfig, AugmentConfig, ColumnsConfig, DataConfig, MeshConfig, TrainConfig,
           DistConfig, LauncherConfig, Config)
"""Every dataclass of the config, for documentation and tests."""

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("train", "predict"),
    "data.kind": ("synthetic", "csv"),
    "head.name": ("max", "mean", "attention", "topk"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("onecycle", "cosine", "constant"),
    "train.trunk": ("train", "frozen"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "launcher.name": ("local", "slurm"),
}
"""Keys whose value must be one of a few names."""


def check(cfg: DictConfig) -> DictConfig:
    """Refuse, before anything runs, naming the key: a key outside the schema (added with ``+``), a
    value outside :data:`CHOICES`, a missing value (``???``), classes that do not fit the model, and
    values that do not fit together; returns ``cfg``.

    Raises
    ------
    halo.errors.InputError
        A ``ValueError``: launchers print it once and exit with status 2.
    """
    from omegaconf import OmegaConf

    from halo.errors import InputError

    unknown = _unknown_keys(cfg, Config, "")
    if unknown:
        raise InputError("; ".join(unknown))
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in allowed:
            raise InputError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if OmegaConf.select(cfg, "mode") == "predict":  # the checkpoint names its classes
        missing = [k for k in missing if k != "data.classes"]
    if missing:
        hints = {"data.csv": "data.csv=<cohort.csv>", "data.classes": "data.classes=[normal,tumour]"}
        raise InputError(f"missing: {', '.join(missing)}: give "
                         + " ".join(hints.get(k, f"{k}=<value>") for k in missing) + " on the command line")
    classes = OmegaConf.select(cfg, "data.classes", default=None)
    if classes is not None and OmegaConf.select(cfg, "mode") == "train":  # predict: the checkpoint's
        names = [str(c) for c in classes]
        if len(names) < 2:
            raise InputError(f"data.classes=[{','.join(names)}] names {len(names)} class: a slide classifier needs at "
                             "least 2 (e.g. data.classes=[normal,tumour])")
        n = OmegaConf.select(cfg, "model.num_classes")
        if n is not None and int(n) != len(names):
            raise InputError(f"data.classes names {len(names)} classes ({', '.join(names)}) but model.num_classes={n}: "
                             f"add model.num_classes={len(names)}")
    blocks = OmegaConf.select(cfg, "blocks")
    if blocks:
        if len(blocks) != 2 or min(int(b) for b in blocks) < 1:
            raise InputError(f"blocks={list(blocks)!r} must be [rows, cols], both >= 1 (or [] to shard over the mesh)")
        if OmegaConf.select(cfg, "mode") != "predict":
            raise InputError(f"blocks={list(blocks)!r} is for mode=predict (training shards over mesh.rows x mesh.cols)")
    canvas = OmegaConf.select(cfg, "data.canvas")
    if canvas is not None and int(canvas) < 0:
        raise InputError(f"data.canvas={canvas!r} must be 0 (pad only as the mesh needs) or a positive multiple")
    return cfg


def _unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    """Keys of ``node`` that its dataclass ``schema`` (and theirs, below) does not have: what Hydra's
    ``+key=value`` adds past the typed config, which nothing reads. Open mappings
    (``head.options``, ``launcher.additional_parameters``) take any key."""
    import dataclasses
    import difflib
    import typing

    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    problems = []
    for key in node:
        path = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            problems.append(f"{path} is not a key of {prefix.rstrip('.') or 'the config'}"
                            + (f" (did you mean {prefix}{near[0]}?)" if near else "")
                            + f": it would be ignored; its keys are {', '.join(names)}")
        elif dataclasses.is_dataclass(hints.get(key)) and isinstance(node[key], DictConfig):
            problems += _unknown_keys(node[key], hints[key], f"{path}.")
    return problems


def tissue_options(data: DictConfig):
    """``data.tissue`` as :class:`halo.data.TissueOptions`."""
    from halo.data import TissueOptions

    return TissueOptions(**{k: data.tissue[k] for k in data.tissue})


def augment_options(data: DictConfig):
    """``data.augment`` as :class:`halo.data.Augment` (``enabled`` decides whether it is used)."""
    from halo.data import Augment

    return Augment(**{k: data.augment[k] for k in data.augment if k != "enabled"})


def register() -> None:
    """Put the schema in Hydra's ConfigStore as ``halo_schema`` (idempotent)."""
    ConfigStore.instance().store(name="halo_schema", node=Config)


register()
