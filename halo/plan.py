"""halo-plan: activation memory, halo traffic and FLOPs per rank, before buying GPUs.

The model is run in training mode on a small image (64 x 64, or four output strides of a
slide classifier's trunk) with hooks on every module and on autograd's saved tensors, which
records every layer's tensors and window geometry; then once more on a 2x-by-3x image, which
says how each saved tensor's dims grow with the height, the width or the area (weights and
running statistics are left as they were). Everything else is arithmetic: each traced shape
``(1, C, a, b)`` becomes ``(N, C, a h / T, b w / T)`` for a local block of ``h x w``, so a
100,000 x 100,000 slide is never allocated.

Saved bytes follow what autograd really keeps (checked against
``torch.autograd.graph.saved_tensors_hooks`` in the tests). The layers halo changes are
modelled: a convolution saves its input block and, in halo, the thin halo strips; max
pooling int64 indices (in halo also those of its border bands; plain torch also keeps the
input); batch norm (and timm's ``BatchNormAct2d``) saves its input; ReLU its output; average
pooling the halo-extended input; global pooling nothing. Point-wise layers (activations,
``Linear``, dropout, stochastic depth) and the functional ops in a container's own ``forward``
(squeeze-excitation's product, a slide head's attention, residual additions, which save
nothing) are measured: what autograd saved on the trace, scaled to the block. Any other
layer (group or layer norm, SAME-padded or weight-standardised convolutions) is refused with
its module path and type. A tensor saved by two layers (a ReLU's output feeding a
convolution) is counted once, and parameters and buffers are not activations. Parameters,
gradients and the two AdamW states are float32 (autocast keeps master weights in float32);
activations use ``--dtype``.

Halo bytes are the two-phase volume: rows first (``top + bottom`` rows of the block
width), then columns of the row-extended block, sent once forward (again when a checkpointed
stage is recomputed) and once backward (the adjoint), except for a first layer whose input
needs no gradient. ``halo_bytes_per_step_per_rank`` is the mean over the ranks of the mesh;
``ranks`` gives each kind of rank (corner, edge, interior) by its busiest member, since
ranks at the image edges send less (an interior rank of 8 x 8 sends 8/7 of the mean). What
a rank saves does not depend on where it sits (edge fills are kept as received strips are),
so every kind has the same activation bytes and peak; ``fits`` is that of the largest.

``--measure`` checks a plan by running it: one training step of halo's real layers at the
planned size, on ``FakeTensorMode`` tensors and parameters (nothing allocated) under torch's
fake process-group backend playing one rank of the full world (the busiest, an interior one
on meshes of 3 x 3 and up), in a fresh Python process; it counts what autograd saves,
``FlopCounterMode``'s FLOPs and the bytes posted to ``batch_isend_irecv`` (:func:`measure`).

``--time`` turns the plan into seconds per step, per epoch (``--cohort`` slides of ``--image``'s
size; with ``--slide`` / ``--csv`` each slide's own step, the epoch over those slides,
:func:`cohort_time`) and in all (``--epochs``), printing every assumption (:func:`estimate_time`): the accelerator's dense peak
FLOP/s from its spec sheet (``--gpu``, :data:`GPUS`) times an achieved fraction (default 0.4,
an assumption unless measured: ``benchmarks/bench_gpu.py`` prints the measured one), NVLink
within a node and InfiniBand across nodes (ranks fill nodes in rank order), a latency per
message, and the synchronisations of a step counted from the model (:func:`step_syncs`: halo
phases and messages, batch-norm, pooling and head collectives, DDP's gradient all-reduce).
Communication does not overlap computation unless ``--overlap``: the default is an upper bound.

The command line plans what ``halo-train`` builds (``halo.models.build_classifier``) on an
image of ``--image HEIGHT WIDTH`` pixels, or on the padded region training reads from each
slide (``--slide``, ``--csv``: read and planned by ``halo.data.SlideDataset`` itself, as training
reads ``data.csv``: its delimiter, header aliases and ``--columns``, labels not read); the flags it shares
with ``halo-train`` (model, mesh, head, classes, checkpointing, mpp, level) default to halo-train's own
defaults (:func:`train_defaults`), so that a plan with defaults is of the run with defaults. Sizes are
``(height, width)`` throughout and printed ``H x W``; ``halo.data``'s sizes are
``(width, height)``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from halo.errors import HaloNotSupportedError, HaloShapeError
from halo.exchange import HaloSpec
from halo.geometry import padded_size
from halo.nn._window import border_bands, native_padding, pair, split_local, window_spec

__all__ = ["LayerPlan", "Plan", "RankKind", "SlidePlan", "Trace", "Measurement", "plan", "plan_model", "plan_slide",
           "trace_model", "rank_kind", "measure", "measure_saved_bytes", "measure_checkpointed_bytes", "build_model",
           "main", "GpuSpec", "GPUS", "Collective", "StepSyncs", "TimeAssumptions", "step_syncs", "estimate_time",
           "cohort_time", "gpu_for_device", "math_mode", "parse_args", "train_defaults", "TRAIN_DEFAULTS"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
TRACE_SIZE = 64
GB = 1e9


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerPlan:
    """One leaf layer on one rank.

    Attributes
    ----------
    name, type:
        Module path and class name.
    in_shape, out_shape:
        Local ``(N, C, h, w)`` block shapes (2-D after flattening).
    halo:
        ``(top, bottom, left, right)`` halo widths of a window op, else ``None``.
    saved_bytes:
        Bytes this layer adds to what autograd keeps (shared tensors counted once).
    halo_bytes:
        Bytes sent per training step (forward, a checkpointed stage's recompute, backward), mean
        over ranks.
    flops:
        Forward FLOPs on this rank (2 per multiply-add).
    exchanges:
        ``(forward, backward)``: how often per step the layer's halo travels forward (twice in a
        checkpointed stage: the recompute exchanges again) and back (0 for an input that needs
        no gradient). :meth:`Plan.halo_bytes_at` turns them into one rank's bytes.
    """

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    halo: tuple[int, int, int, int] | None
    saved_bytes: int
    halo_bytes: int
    flops: int
    exchanges: tuple[int, int] = (0, 0)


def rank_kind(mesh: tuple[int, int], row: int, col: int) -> str:
    """``"corner"``, ``"edge"`` or ``"interior"``: on how many sharded axes (``rows`` or ``cols``
    above 1) the rank at ``(row, col)`` lacks a neighbour (2, 1 or 0); ``"single"`` on a 1 x 1
    mesh. On a 1 x C mesh the two ends are edges; on a 2 x 2 mesh every rank is a corner."""
    rows, cols = mesh
    if rows * cols == 1:
        return "single"
    missing = sum(1 for i, n in ((row, rows), (col, cols)) if n > 1 and i in (0, n - 1))
    return ("interior", "edge", "corner")[missing]


@dataclass(frozen=True, kw_only=True, slots=True)
class RankKind:
    """The ranks of one kind (:func:`rank_kind`) in a plan.

    Attributes
    ----------
    kind, count:
        The kind and how many ranks of the mesh are of it.
    rank:
        ``(row, col)`` of the rank of this kind that sends the most halo bytes (the first in
        row-major order among equals); its figures are the ones given.
    halo_bytes_per_step:
        What that rank sends per step (forward, recomputation and backward).
    activation_bytes, total_bytes, fits:
        Its activation bytes, peak and whether that fits. These are the same for every kind:
        at the image edges halo saves and recomputes the edge fill as it does a received strip
        (measured), so only the traffic differs.
    """

    kind: str
    count: int
    rank: tuple[int, int]
    halo_bytes_per_step: int
    activation_bytes: int
    total_bytes: int
    fits: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Per-rank memory, traffic and work of one training step; see :func:`plan`."""

    model: str
    image: tuple[int, int]
    padded_image: tuple[int, int]
    mesh: tuple[int, int]
    block: tuple[int, int]
    dtype: str
    batch: int
    checkpointing: bool
    activation_bytes_per_rank: int
    param_count: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    workspace_bytes: int
    total_bytes_per_rank: int
    halo_bytes_per_step_per_rank: int
    forward_flops_per_rank: int
    flops_per_rank: int
    gpu_memory_bytes: int
    fits: bool
    mpp: float | None
    layers: tuple[LayerPlan, ...]
    ranks: tuple[RankKind, ...] = ()
    busiest_rank: tuple[int, int] = (0, 0)

    def halo_bytes_at(self, row: int, col: int) -> int:
        """Bytes the rank at ``(row, col)`` sends in one step (the two-phase exchange of every
        window layer: forward, again in a checkpointed stage's recompute, and back)."""
        return _rank_halo_bytes(self.layers, self.mesh, DTYPE_BYTES[self.dtype], row, col)

    def summary(self) -> dict:
        """Everything but the per-layer table, as JSON-ready values."""
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        out["ranks"] = {r.kind: {k: v for k, v in asdict(r).items() if k != "kind"} for r in self.ranks}
        if self.mpp is not None:
            out["field_mm"] = [round(s * self.mpp / 1000, 3) for s in self.image]
        return out


def _rank_halo_bytes(layers: Sequence[LayerPlan], mesh: tuple[int, int], eb: int, row: int, col: int) -> int:
    """Per window layer, what one rank sends: forward, its top rows to the next row of ranks
    (their top halo), its bottom ``max(bottom, 0)`` rows to the previous, then columns of the
    row-extended block (``top + h + bottom`` rows) the same way; backward, the gradients of the
    strips it received, to their owners."""
    rows, cols = mesh
    total = 0
    for l in layers:
        if l.halo is None:
            continue
        top, bottom, left, right = l.halo
        n, c, bh, bw = l.in_shape
        eh = bh + top + bottom
        bottom, right = max(bottom, 0), max(right, 0)
        prev_r, next_r, prev_c, next_c = row > 0, row < rows - 1, col > 0, col < cols - 1
        fwd = (next_r * top + prev_r * bottom) * bw + (next_c * left + prev_c * right) * eh
        bwd = (prev_r * top + next_r * bottom) * bw + (prev_c * left + next_c * right) * eh
        forward, backward = l.exchanges
        total += n * c * eb * (forward * fwd + backward * bwd)
    return total


@dataclass(slots=True)
class _Saved:
    """One tensor autograd saved while a module that the planner measures was running."""

    key: int  # storage
    shape: tuple[int, ...]  # at the trace size, batch 1
    itemsize: int
    floating: bool
    grow: tuple[str, ...] = ()  # per dim: "1" fixed, "n" batch, "h", "w" or "hw" (scales with the block)


@dataclass(slots=True)
class _Traced:
    name: str
    module: nn.Module
    ins: tuple[int, tuple[int, ...]]  # (storage key, shape) of the first input
    out: tuple[int, tuple[int, ...]]
    segment: str | None
    kind: str = "measured"  # a modelled kind (see _kind), or "measured"
    saves: list[_Saved] = field(default_factory=list)
    leaf: bool = True


@dataclass(slots=True)
class Trace:
    """A model's layers in call order at ``size`` x ``size`` (see :func:`trace`): computed once,
    reused by :func:`plan_model` for every image size and mesh."""

    records: list[_Traced]
    size: int
    stride: int


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _stages(model: nn.Module) -> Sequence[nn.Module]:
    """The units ``halo.models.SlideClassifier`` checkpoints: its trunk's stages, or those
    ``build_trunk`` cuts from a torchvision classifier (a ResNet's stem and its four layers);
    otherwise each child of a top-level ``nn.Sequential``."""
    from halo.models import SlideClassifier, build_trunk

    if isinstance(model, SlideClassifier):
        return list(model.trunk)
    try:
        return list(build_trunk(model)[0])
    except ValueError:
        return [block for child in model.children() if isinstance(child, nn.Sequential) for block in child.children()]


def _segments(model: nn.Module) -> dict[str, str]:
    """Module path -> checkpoint segment (the stage holding it, as :func:`_stages` cuts them)."""
    stage_of = {id(m): f"stage{i}" for i, stage in enumerate(_stages(model)) for m in stage.modules()}
    return {name: stage_of[id(m)] for name, m in model.named_modules() if id(m) in stage_of}


@functools.cache
def _modelled_types() -> dict[type[nn.Module], str]:
    """Exact type -> kind of the layers whose saved tensors and halos the planner computes itself
    (checked against autograd and the exchange in tests/test_plan.py)."""
    kinds: dict[type[nn.Module], str] = {
        nn.Conv2d: "conv", nn.MaxPool2d: "maxpool", nn.AvgPool2d: "avgpool",
        nn.BatchNorm2d: "bn", nn.SyncBatchNorm: "bn",  # halo's twin saves the input and two statistics
        nn.ReLU: "output", nn.Sigmoid: "output", nn.Tanh: "output",
        nn.AdaptiveMaxPool2d: "amax", nn.Flatten: "nothing", nn.Identity: "nothing", nn.AdaptiveAvgPool2d: "nothing",
    }
    try:
        import timm.layers

        kinds[timm.layers.BatchNormAct2d] = "bn"  # its batch norm; its drop and act children are their own layers
    except ImportError:
        pass
    return kinds


def _kind(m: nn.Module) -> str | None:
    """How the planner plans ``m``: a modelled kind, ``"measured"`` (a point-wise layer, or the
    functional ops of a container's own forward: autograd's saved tensors on the trace, scaled to
    the block), or None (it cannot plan it)."""
    from halo.parallelize import FAMILIES, default_local_modules

    kind = _modelled_types().get(type(m))
    if kind is not None:
        return kind
    local = default_local_modules()
    if type(m) in local or (isinstance(m, local) and not isinstance(m, FAMILIES)):
        return "measured"
    if isinstance(m, FAMILIES):  # a window or normalisation layer the planner has no model of
        return None
    return "measured" if len(m._modules) else None


def _check_plannable(model: nn.Module) -> None:
    """Refuse, naming it, the first layer whose memory under halo the planner does not model."""
    for name, m in model.named_modules():
        if _kind(m) is None:
            kind = type(m)
            modelled = ", ".join(sorted({t.__name__ for t in _modelled_types()}))
            raise HaloNotSupportedError(
                f"halo-plan cannot plan {name or '(model)'} ({kind.__module__}.{kind.__qualname__}): what it saves "
                f"for backward and the halos it exchanges under halo are not modelled; the planner models "
                f"{modelled}, point-wise layers and the functional ops of containers (residual additions, "
                f"squeeze-excitation, slide heads)"
            )


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def _run_traced(model: nn.Module, height: int, width: int, channels: int) -> list[_Traced]:
    """One training-mode forward of ``model`` on a ``height x width`` image, recording every
    module call (leaves, modelled layers and containers whose own ops saved tensors) in the
    order the calls end, with the tensors autograd saved while it was the innermost module."""
    from halo.models import SlideClassifier

    records: list[_Traced] = []
    keep: list[object] = []  # hold every tensor so no storage address is reused
    seg = _segments(model)
    names = {id(m): name for name, m in model.named_modules()}
    state = {_key(t) for t in itertools.chain(model.parameters(), model.buffers())}
    stack: list[list[_Saved]] = [[]]

    def pre(m, args):
        stack.append([])

    def post(m, args, out):
        saves = stack.pop()
        kind = _kind(m)
        leaf = len(m._modules) == 0
        if not (leaf or kind != "measured" or saves):
            return
        x, y = _first_tensor(args), _first_tensor(out)
        keep.extend([args, out])
        name = names.get(id(m), type(m).__name__)
        ins = (_key(x), tuple(x.shape)) if x is not None else (0, ())
        outs = (_key(y), tuple(y.shape)) if y is not None else (0, ())
        records.append(_Traced(name, m, ins, outs, seg.get(name), kind or "measured", saves, leaf))

    def pack(t: torch.Tensor):
        k = _key(t)
        if k not in state:
            keep.append(t)
            stack[-1].append(_Saved(k, tuple(t.shape), t.element_size(), t.is_floating_point() or t.is_complex()))
        return t

    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post, always_call=True))
    was = model.training
    ckpt = [(m, m.checkpointing) for m in model.modules() if isinstance(m, SlideClassifier)]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for m, _ in ckpt:  # recomputation's own saved-tensor hooks would hide each stage's tensors
            m.checkpointing = False
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))
            keep.append(model.train()(x))
    finally:
        model.train(was)
        for m, flag in ckpt:
            m.checkpointing = flag
        with torch.no_grad():
            for b, value in buffers:  # batch-norm running statistics as they were
                b.copy_(value)
        [h.remove() for h in hooks]
    if stack != [[]]:  # a functional op of the model's own forward outside any module
        records.append(_Traced("(model)", model, (0, ()), (0, ()), None, "measured", stack[0], False))
    return records


def _grow(name: str, a: tuple[int, ...], b: tuple[int, ...], size: int) -> tuple[str, ...]:
    """Per dim of a saved tensor, how it grows with the image, from its shapes on a ``size x size``
    and a ``2 size x 3 size`` image (height doubles, width triples, area grows 6 times)."""
    if len(a) != len(b):
        raise HaloNotSupportedError(f"halo-plan cannot plan {name}: a tensor it saves has shape {a} on a {size} x "
                                    f"{size} image but {b} on {2 * size} x {3 * size}")
    grow = []
    for i, (s, t) in enumerate(zip(a, b)):
        if t == s:
            grow.append("n" if i == 0 and s == 1 and len(a) >= 2 else "1")
        elif t == 2 * s:
            grow.append("h")
        elif t == 3 * s:
            grow.append("w")
        elif t == 6 * s:
            grow.append("hw")
        else:
            raise HaloNotSupportedError(
                f"halo-plan cannot plan {name}: a tensor it saves for backward has shape {a} on a {size} x {size} "
                f"image and {b} on {2 * size} x {3 * size}, not proportional to the image")
    return tuple(grow)


def trace(model: nn.Module, size: int = TRACE_SIZE, channels: int = 3) -> list[_Traced]:
    """Layers in call order with their input/output storages and shapes at ``size`` x ``size``,
    and, for the layers the planner measures, what autograd saves (with how each dim grows)."""
    _check_plannable(model)
    records = _run_traced(model, size, size, channels)
    again = _run_traced(model, 2 * size, 3 * size, channels)
    if [r.name for r in records] != [r.name for r in again]:
        raise HaloNotSupportedError("halo-plan cannot plan this model: it calls different modules on different "
                                    "image sizes")
    for r, q in zip(records, again):
        if r.kind != "measured":
            r.saves = []
            continue
        if len(r.saves) != len(q.saves):
            raise HaloNotSupportedError(f"halo-plan cannot plan {r.name} ({type(r.module).__name__}): it saves "
                                        f"{len(r.saves)} tensors on one image size and {len(q.saves)} on another")
        for s, t in zip(r.saves, q.saves):
            s.grow = _grow(f"{r.name} ({type(r.module).__name__})", s.shape, t.shape, size)
    return records


def trace_model(model: nn.Module, size: int | None = None, multiple: int | None = None) -> Trace:
    """:func:`trace` at ``size`` (default: 64, or 4 output strides of a slide classifier's trunk, and
    larger while the model refuses the image, e.g. a top-k head with more k than positions), with
    the total stride (``multiple``, default ``halo.models.total_stride`` of a slide classifier's
    trunk, else input over output size of the trace's window and normalisation layers)."""
    from halo.models import SlideClassifier, total_stride

    if multiple is None and isinstance(model, SlideClassifier):
        multiple = total_stride(model.trunk)
    if size is None:
        size = max(TRACE_SIZE, 4 * (multiple or 1))
        for _ in range(4):
            try:
                records = trace(model, size)
                break
            except HaloShapeError:
                size *= 2
        else:
            records = trace(model, size)
    else:
        records = trace(model, size)
    if multiple is None:
        multiple = max(size // r.out[1][-1] for r in records if r.kind in _WINDOW_OR_NORM and len(r.out[1]) == 4)
    if size % multiple:
        raise ValueError(f"trace size {size} is not a multiple of the total stride {multiple}")
    return Trace(records, size, int(multiple))


def _halo(m: nn.Module, name: str) -> HaloSpec | None:
    if isinstance(m, nn.Conv2d):
        return window_spec(name, "Conv2d", m.kernel_size, m.stride, m.padding, m.dilation)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        stride = m.stride if m.stride is not None else m.kernel_size
        return window_spec(name, type(m).__name__, m.kernel_size, stride, m.padding, getattr(m, "dilation", 1))
    return None


def _band_outputs(m: nn.MaxPool2d, spec: HaloSpec, padding: tuple[int, int], ins: tuple[int, ...],
                  outs: tuple[int, ...]) -> int:
    """Outputs of a max pooling's border bands on a block of shape ``ins``: every rank keeps
    their indices besides the block's own (none where the pooling assembles its block)."""
    if native_padding(spec, padding) is None:
        return 0
    stride = m.stride if m.stride is not None else m.kernel_size
    bands = border_bands(ins, spec, pair(m.kernel_size), pair(stride), pair(m.dilation), outs[-2:])
    return outs[0] * outs[1] * sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1), _, _ in bands)


_WINDOW_OR_NORM = ("conv", "maxpool", "avgpool", "bn")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True, slots=True)
class _Grid:
    """Mesh degrees only, as :func:`halo.nn._window.split_local` reads them."""

    rows: int
    cols: int


def plan_model(
    model: nn.Module,
    *,
    name: str,
    image: tuple[int, int],
    mesh: tuple[int, int] = (1, 1),
    dtype: str = "float32",
    batch: int = 1,
    checkpointing: bool = False,
    halo_layers: bool = True,
    input_requires_grad: bool = False,
    gpu_memory: float = 80 * GB,
    mpp: float | None = None,
    trace_size: int | None = None,
    traced: Trace | None = None,
) -> Plan:
    """Plan one training step of ``model`` on an ``image`` of ``(height, width)`` pixels sharded
    over a ``mesh`` of ``(rows, cols)`` ranks.

    The image is padded to a multiple of ``rows`` (``cols``) times the total stride, as the data
    path pads; ``halo.models.total_stride`` for a :class:`halo.models.SlideClassifier`.

    Parameters
    ----------
    halo_layers:
        Model halo's layers (strips, extended pooling inputs); ``False`` plans plain torch
        on one process (``mesh`` must then be ``(1, 1)``).
    input_requires_grad:
        Whether the image needs a gradient (then the first layer's halo travels back too).
    traced:
        ``trace_model(model)``, to plan many sizes and meshes of one model without tracing again.

    Raises
    ------
    HaloNotSupportedError
        A layer the planner cannot plan, named by its module path and type.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    rows, cols = mesh
    grid = _Grid(rows, cols)
    if rows < 1 or cols < 1 or batch < 1 or min(image) < 1:
        raise ValueError(f"mesh, batch and image sizes must be positive, got mesh={mesh}, batch={batch}, image={image}")
    if not halo_layers and (rows, cols) != (1, 1):  # plain torch has no mesh
        raise ValueError(f"halo_layers=False plans one process; mesh must be (1, 1), got {mesh}")
    if traced is None:
        traced = trace_model(model, trace_size)
    records, trace_size, total_stride = traced.records, traced.size, traced.stride
    ph, pw = padded_size(image[0], rows * total_stride), padded_size(image[1], cols * total_stride)
    h, w = ph // rows, pw // cols
    eb = DTYPE_BYTES[dtype]

    def scale(shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 0:
            return shape
        if len(shape) != 4:
            return (batch, *shape[1:])
        return (batch, shape[1], shape[2] * h // trace_size, shape[3] * w // trace_size)

    factor = {"1": lambda s: s, "n": lambda s: batch, "h": lambda s: s * h // trace_size,
              "w": lambda s: s * w // trace_size, "hw": lambda s: s * h * w // trace_size**2}

    def saved_bytes(s: _Saved) -> int:
        n = _numel(factor[g](d) for g, d in zip(s.grow, s.shape))
        return n * (eb if s.floating else s.itemsize)

    sharded = halo_layers and rows * cols > 1
    layers: list[LayerPlan] = []
    seen: set[int] = set()
    seg_seen: set[int] = set()
    seg_peak: dict[str, int] = {}
    outside = 0
    first_window = True
    for r in records:
        m, kind, ins, outs = r.module, r.kind, scale(r.ins[1]), scale(r.out[1])
        spec = _halo(m, r.name) if halo_layers and kind in ("conv", "maxpool", "avgpool") else None
        local_pad = (0, 0)
        if spec is not None and kind in ("conv", "maxpool"):
            spec, local_pad = split_local(spec, grid)  # unsharded dims use the op's own padding
        elif spec is not None and rows * cols == 1:  # average pooling on one rank is plain torch
            spec = None
        if spec is not None and spec.is_empty:
            spec = None
        fresh = 0  # bytes of tensors only this layer saves
        keyed: list[tuple[int, int]] = []  # (storage key, bytes) shared with other layers
        nin, nout = _numel(ins), _numel(outs)
        if kind == "maxpool":  # int64 indices; plain torch also keeps the input
            fresh += nout * 8
            if spec is not None:  # by bands, also those of the border bands' outputs
                fresh += _band_outputs(m, spec, local_pad, ins, outs) * 8
            if not halo_layers:
                keyed.append((r.ins[0], nin * eb))
        elif kind == "conv":  # the block (shared) and the thin strips
            keyed.append((r.ins[0], nin * eb))
            if spec is not None:
                n, c, bh, bw = ins
                eh = bh + spec.top + spec.bottom
                fresh += n * c * eb * ((spec.top + max(spec.bottom, 0)) * bw + (spec.left + max(spec.right, 0)) * eh)
        elif kind == "bn":
            keyed.append((r.ins[0], nin * eb))
            fresh += 2 * ins[1] * eb
        elif kind == "avgpool":  # sharded: nothing but the divisors that exclude padding
            if halo_layers and rows * cols > 1:
                if not m.count_include_pad and m.divisor_override is None and spec is not None:
                    fresh += outs[2] * outs[3] * eb
            else:
                keyed.append((r.ins[0], nin * eb))
        elif kind == "output":
            keyed.append((r.out[0], nout * eb))
        elif kind == "amax":
            keyed.append((r.ins[0], nin * eb))
            fresh += nout * 8
            if sharded:  # global_max_pool2d keeps which rank holds each maximum: one bool per channel
                fresh += nout
        elif kind == "measured":  # what autograd saved on the trace, scaled to the block
            keyed.extend((s.key, saved_bytes(s)) for s in r.saves)
            if sharded:  # a functional global max pooling (a max head): its indices, and the bool owner mask
                fresh += sum(saved_bytes(s) // 8 for s in r.saves if _is_global_max_indices(s))
        segmented = checkpointing and r.segment is not None
        if segmented and r.segment not in seg_peak:  # a new segment keeps only its input
            seg_peak[r.segment], seg_seen = 0, set()
            if r.ins[0] not in seen:
                seen.add(r.ins[0])
                outside += nin * eb
        saved = fresh
        for key, nbytes in keyed:
            pool = seg_seen if segmented else seen
            if key not in pool and not (segmented and key in seen):  # a segment's input is kept outside it
                pool.add(key)
                saved += nbytes
        if segmented:
            seg_peak[r.segment] += saved
        else:
            outside += saved
        halo_bytes, exchanges = 0, (0, 0)
        if spec is not None:
            n, c, bh, bw = ins
            eh = bh + spec.top + spec.bottom
            rows_sent = (rows - 1) / rows * (spec.top + max(spec.bottom, 0)) * bw
            cols_sent = (cols - 1) / cols * (spec.left + max(spec.right, 0)) * eh
            exchanges = (2 if segmented else 1, 0 if first_window and not input_requires_grad else 1)
            halo_bytes = round(sum(exchanges) * n * c * eb * (rows_sent + cols_sent))
        if kind in ("conv", "maxpool", "avgpool"):
            first_window = False
        layers.append(LayerPlan(
            name=r.name or "(model)", type=type(m).__name__, in_shape=ins, out_shape=outs,
            halo=None if spec is None else (spec.top, spec.bottom, spec.left, spec.right),
            saved_bytes=saved, halo_bytes=halo_bytes, flops=_flops(m, ins, outs) if r.leaf else 0, exchanges=exchanges,
        ))
    activation = outside + max(seg_peak.values(), default=0) if checkpointing else sum(l.saved_bytes for l in layers)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * 4
    largest = max((_numel(l.out_shape) for l in layers), default=0) * eb
    workspace = 2 * largest + 2**30  # a layer's output and input gradient in flight, CUDA context
    total = activation + 4 * param_bytes + workspace
    fwd = sum(l.flops for l in layers)
    kinds: dict[str, list[tuple[int, int, int]]] = {}  # kind -> (halo bytes, row, col) of each of its ranks
    for i, j in itertools.product(range(rows), range(cols)):
        kinds.setdefault(rank_kind((rows, cols), i, j), []).append((_rank_halo_bytes(layers, (rows, cols), eb, i, j), i, j))
    ranks = []
    for kind in ("corner", "edge", "interior", "single"):
        if kind in kinds:
            sent, i, j = max(kinds[kind], key=lambda t: (t[0], -t[1], -t[2]))  # the first of the busiest
            ranks.append(RankKind(kind=kind, count=len(kinds[kind]), rank=(i, j), halo_bytes_per_step=sent,
                                  activation_bytes=int(activation), total_bytes=int(total), fits=total <= gpu_memory))
    busiest = max(reversed(ranks), key=lambda k: k.halo_bytes_per_step)  # among equals the most interior kind
    return Plan(
        model=name, image=tuple(image), padded_image=(ph, pw), mesh=(rows, cols), block=(h, w), dtype=dtype,
        batch=batch, checkpointing=checkpointing, activation_bytes_per_rank=int(activation), param_count=params,
        param_bytes=param_bytes, grad_bytes=param_bytes, optimizer_bytes=2 * param_bytes, workspace_bytes=workspace,
        total_bytes_per_rank=int(total), halo_bytes_per_step_per_rank=sum(l.halo_bytes for l in layers),
        forward_flops_per_rank=fwd, flops_per_rank=3 * fwd + (fwd if checkpointing else 0),
        gpu_memory_bytes=int(gpu_memory), fits=all(k.fits for k in ranks), mpp=mpp, layers=tuple(layers),
        ranks=tuple(ranks), busiest_rank=busiest.rank,
    )


def _is_global_max_indices(s: _Saved) -> bool:
    """Whether a tensor a measured layer saved is the int64 indices of a global max pooling
    (``(N, C, 1, 1)``): on a mesh, halo's global max pooling also keeps an ``(N, C, 1, 1)`` bool
    saying which rank holds each maximum, which the one-process trace cannot see."""
    return not s.floating and s.itemsize == 8 and len(s.shape) == 4 and s.grow == ("n", "1", "1", "1") \
        and s.shape[2:] == (1, 1)


def _flops(m: nn.Module, ins: tuple[int, ...], outs: tuple[int, ...]) -> int:
    if isinstance(m, nn.Conv2d):
        kh, kw = pair(m.kernel_size)
        return 2 * _numel(outs) * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return 2 * _numel(outs) * m.in_features
    return _numel(outs)  # pointwise, normalisation, pooling: about one op per output


def build_model(name: str, num_classes: int = 2) -> nn.Module:
    """A torchvision classification model by name (random weights)."""
    import torchvision

    if not hasattr(torchvision.models, name):
        raise ValueError(f"unknown model {name!r}: expected a torchvision.models builder such as resnet50")
    return getattr(torchvision.models, name)(num_classes=num_classes)


def plan(model: str, image: tuple[int, int], mesh: tuple[int, int] = (1, 1), **kwargs) -> Plan:
    """:func:`plan_model` for a torchvision model given by name."""
    return plan_model(build_model(model), name=model, image=image, mesh=mesh, **kwargs)


def _storage_key(t: torch.Tensor) -> int:
    """A storage's identity: its address, or for storages without one (fake tensors' data_ptr()
    is 0) the storage object itself, which views share."""
    storage = t.untyped_storage()
    return storage.data_ptr() or storage._cdata


def measure_saved_bytes(step: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd saves while ``step()`` runs the forward pass, each storage counted once.

    Storages of ``exclude`` (parameters, buffers) are not counted. The graph is kept
    alive until the count is taken, then freed.
    """
    return sum(_saved_storages(step, exclude)[0].values())


def _saved_storages(step: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()
                    ) -> tuple[dict[int, int], torch.Tensor]:
    """Storage -> bytes of what autograd saves while ``step()`` runs, and ``step()``'s output
    (its graph keeps those storages alive, and their addresses distinct, while it is held)."""
    skip = {_storage_key(t) for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor):
        k = _storage_key(t)
        if k not in skip:
            sizes[k] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return sizes, out


def measure_checkpointed_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps at the peak of a training step of a stage-checkpointed ``model``
    (a :class:`halo.models.SlideClassifier` with ``checkpointing=True``, sharded or not).

    The checkpointed forward's saved tensors (each stage's input, the head's), plus the most
    any one trunk stage saves when run as an ordinary forward, as it is when recomputed in
    backward, less its input, which the checkpointed forward already keeps. Parameters and
    buffers are not counted.
    """
    state = list(model.parameters()) + list(model.buffers())
    outside = measure_saved_bytes(lambda: model(x), state)
    largest = 0
    for stage in model.trunk:
        inside = _saved_storages(lambda: stage(x), state)[0]
        inside.pop(_storage_key(x), None)
        largest = max(largest, sum(inside.values()))
        with torch.no_grad():
            x = stage(x)
    return outside + largest


# -- --measure: halo's real layers at the planned size, on fake tensors -------------------------

#: Largest relative difference between planned and measured that ``--measure`` accepts.
MEASURE_LIMITS = {"activation_bytes_per_rank": 0.01, "flops_per_rank": 0.03, "halo_bytes_per_step": 0.01}


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    """One rank's training step through halo's real layers, measured by :func:`measure`.

    Attributes
    ----------
    rank, kind:
        ``(row, col)`` on the mesh and its :func:`rank_kind`.
    saved_bytes:
        What autograd keeps for backward (each storage once, parameters and buffers not
        counted); with checkpointing, what the checkpointed forward keeps plus the most any
        trunk stage saves when it is recomputed (an ordinary forward of the stage on its real
        input), less that input, as :attr:`Plan.activation_bytes_per_rank` counts.
    forward_flops, flops:
        ``torch.utils.flop_counter.FlopCounterMode``'s count of the forward and of the whole
        step (forward, backward, and the recompute with checkpointing).
    halo_bytes:
        Bytes this rank posts as sends to ``batch_isend_irecv`` in the step (every halo
        exchange, forward, recomputation and backward).
    seconds, max_rss_bytes:
        Wall time of the step and the measuring process's peak resident memory.
    """

    rank: tuple[int, int]
    kind: str
    saved_bytes: int
    forward_flops: int
    flops: int
    halo_bytes: int
    seconds: float
    max_rss_bytes: int


def measure(
    model: str,
    image: tuple[int, int],
    mesh: tuple[int, int] = (1, 1),
    *,
    ranks: Sequence[tuple[int, int]] | None = None,
    head: str = "max",
    num_classes: int = 2,
    dtype: str = "float32",
    batch: int = 1,
    checkpointing: bool = False,
    timeout: float | None = None,
) -> list[Measurement]:
    """Run one training step of ``halo.models.build_classifier(model, num_classes, head=head)``,
    parallelised by halo, on an ``image`` of ``(height, width)`` pixels (padded as the data path
    pads) as each of ``ranks`` (``(row, col)``; default the plan's busiest) of a ``mesh`` sees it,
    without allocating it.

    Tensors, parameters and buffers are ``FakeTensorMode`` fakes (shapes, dtypes and storages, no
    data) and the process group is torch's fake backend pretending to be that rank of the world
    (collectives and point-to-point return at once): every halo layer, exchange and collective
    runs as in training. It runs on the CPU in a fresh Python process (nothing is left
    initialised here): ``dtype="bfloat16"`` casts the model and its input to bfloat16 (CPU
    autocast is not CUDA's, so it is not used).

    Raises
    ------
    RuntimeError
        The measurement failed (its error and the tail of its output), or ran past ``timeout``.
    """
    import os
    import subprocess

    if ranks is None:
        from halo.models import build_classifier

        p = plan_model(build_classifier(model, num_classes, head=head), name=model, image=tuple(image),
                       mesh=tuple(mesh), dtype=dtype, batch=batch, checkpointing=checkpointing)
        ranks = [p.busiest_rank]
    spec = {"model": model, "image": list(image), "mesh": list(mesh), "ranks": [list(r) for r in ranks], "head": head,
            "num_classes": num_classes, "dtype": dtype, "batch": batch, "checkpointing": checkpointing}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", "import sys, halo.plan; sys.exit(halo.plan._measure_child())"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the measurement of {model} on {image[0]} x {image[1]} did not finish within "
                           f"{timeout:g} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MEASURED)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"the measurement of {model} on {image[0]} x {image[1]} failed (exit {proc.returncode}):\n"
                           f"{tail}")
    return [Measurement(**{**d, "rank": tuple(d["rank"])}) for d in json.loads(lines[-1][len(_MEASURED):])]


_MEASURED = "halo-plan-measured: "


def _measure_child() -> int:
    """The measuring process: a JSON spec on stdin (see :func:`measure`), one line of results."""
    spec = json.loads(sys.stdin.read())
    ranks = spec.pop("ranks")
    spec["image"], spec["mesh"] = tuple(spec["image"]), tuple(spec["mesh"])
    out = [asdict(_measure_rank(rank=(int(r), int(c)), **spec)) for r, c in ranks]
    print(_MEASURED + json.dumps(out), flush=True)
    return 0


def _fake_state(model: nn.Module, mode) -> None:
    """Every parameter and buffer of ``model`` replaced by a fake of it (shared ones stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for table, wrap in ((m._parameters, True), (m._buffers, False)):
            for k, v in list(table.items()):
                if v is None:
                    continue
                if id(v) not in memo:
                    fake = mode.from_tensor(v)
                    memo[id(v)] = nn.Parameter(fake, requires_grad=v.requires_grad) if wrap else fake
                table[k] = memo[id(v)]


def _measure_rank(*, model: str, image: tuple[int, int], mesh: tuple[int, int], rank: tuple[int, int], head: str,
                  num_classes: int, dtype: str, batch: int, checkpointing: bool) -> Measurement:
    """One rank's step on fake tensors under a fake process group (see :func:`measure`); in a
    process of its own, which it initialises and leaves uninitialised."""
    import resource
    import time

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils.flop_counter import FlopCounterMode

    import halo
    from halo.models import build_classifier, total_stride

    if dist.is_initialized():
        raise RuntimeError("halo-plan --measure initialises a fake process group; run it in a fresh process "
                           "(halo.plan.measure does)")
    rows, cols = mesh
    row, col = rank
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"rank {rank} is not on a {rows} x {cols} mesh")
    torch.manual_seed(0)
    net = build_classifier(model, num_classes, head=head, checkpointing=checkpointing)
    stride = total_stride(net.trunk)
    ph, pw = padded_size(image[0], rows * stride), padded_size(image[1], cols * stride)
    kind = getattr(torch, dtype)
    dist.init_process_group("fake", store=FakeStore(), rank=row * cols + col, world_size=rows * cols)
    real_send = dist.batch_isend_irecv
    try:
        grid = halo.SpatialMesh(rows, cols)
        assert grid.coords == (0, row, col), grid
        net = halo.parallelize(net.to(kind), grid).train()
        mode = FakeTensorMode()  # a real tensor meeting a fake one is an error, not a silent allocation
        with mode:
            _fake_state(net, mode)
            x = halo.scatter(torch.empty(batch, 3, ph, pw, dtype=kind), grid)
            state = list(net.parameters()) + list(net.buffers())
            sent = [0]

            def counting(ops):
                sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
                return real_send(ops)

            dist.batch_isend_irecv = counting
            start = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                sizes, out = _saved_storages(lambda: net(x), state)
                forward_flops = counter.get_total_flops()
                out.float().sum().backward()
                flops = counter.get_total_flops()
            dist.batch_isend_irecv = real_send
            saved = sum(sizes.values())
            del out
            if checkpointing:  # what the largest stage saves when it is recomputed, less its input (kept outside)
                largest, h = 0, x
                for stage in net.trunk:
                    inside, y = _saved_storages(lambda: stage(h), state)
                    inside.pop(_storage_key(h), None)
                    largest = max(largest, sum(inside.values()))
                    h = y.detach()
                    del y
                saved += largest
            seconds = time.perf_counter() - start
    finally:
        dist.batch_isend_irecv = real_send
        dist.destroy_process_group()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measurement(rank=(row, col), kind=rank_kind(mesh, row, col), saved_bytes=int(saved),
                       forward_flops=int(forward_flops), flops=int(flops), halo_bytes=int(sent[0]),
                       seconds=round(seconds, 3), max_rss_bytes=int(rss))


def measure_checks(p: Plan, m: Measurement) -> list[dict]:
    """Planned against measured, each with its relative difference and the limit ``--measure``
    holds it to (:data:`MEASURE_LIMITS`)."""
    rows = [("activation_bytes_per_rank", p.activation_bytes_per_rank, m.saved_bytes),
            ("flops_per_rank", p.flops_per_rank, m.flops),
            ("halo_bytes_per_step", p.halo_bytes_at(*m.rank), m.halo_bytes)]
    out = []
    for name, planned, measured in rows:
        rel = (planned - measured) / measured if measured else (0.0 if planned == measured else float("inf"))
        limit = MEASURE_LIMITS[name]
        out.append({"name": name, "planned": planned, "measured": measured, "relative": rel, "limit": limit,
                    "ok": abs(rel) <= limit})
    return out


def _dtype_note(dtype: str) -> str:
    if dtype == "float32":
        return "float32"
    return (f"{dtype} on CPU: the model (parameters, buffers) and its input cast to {dtype}, as autocast's "
            f"convolutions see them; CUDA autocast does nothing on CPU (on a GPU it would also keep a {dtype} copy of "
            f"each convolution's weight, which neither column counts)")


_UNITS = ("B", "KB", "MB", "GB", "TB")


def _fmt(n: float) -> str:
    i = next(i for i in range(len(_UNITS)) if abs(n) < 1000 ** (i + 1) or i == len(_UNITS) - 1)
    return f"{n / 1000**i:.1f} {_UNITS[i]}"


# -- --time: seconds per step, per epoch and for a cohort, from the plan and stated assumptions -----

@dataclass(frozen=True, kw_only=True, slots=True)
class GpuSpec:
    """An accelerator preset for ``--time``: dense peak FLOP/s per math mode, memory and links.

    ``peak`` holds the vendor's dense figures (no structured sparsity): ``bf16`` and ``fp16``
    tensor cores, ``tf32`` tensor cores (what cuDNN convolutions use for float32 by default,
    ``torch.backends.cudnn.allow_tf32``) and plain ``fp32``. ``intra_gbps`` is the NVLink
    bandwidth per direction and GPU, ``inter_gbps`` the network (InfiniBand) bandwidth per GPU,
    both in gigabits per second.
    """

    name: str
    peak: dict
    memory_gb: float
    intra_gbps: float
    inter_gbps: float
    source: str


TERA = 1e12
# Dense peaks are the spec sheets' figures; where a sheet gives tensor-core figures "with sparsity"
# only (H100, H200: "specifications 1/2 lower without sparsity"), the dense figure is half of it, as
# NVIDIA's H100 architecture whitepaper gives it for the SXM5 part: 989.4 (BF16, FP16), 494.7 (TF32).
GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67 TFLOPS, TF32 989 TFLOPS*,
    # BF16 / FP16 1,979 TFLOPS* (* with sparsity); 80 GB; NVLink 900 GB/s (450 GB/s each way);
    # DGX H100: one 400 Gb/s ConnectX-7 (NDR InfiniBand) per GPU.
    "h100-sxm": GpuSpec(name="NVIDIA H100 SXM5 80GB",
                        peak={"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 67 * TERA},
                        memory_gb=80, intra_gbps=3600, inter_gbps=400,
                        source="NVIDIA H100 datasheet (SXM): sparse tensor-core figures halved"),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the H100 SXM's compute (FP32 67 TFLOPS,
    # TF32 989*, BF16 / FP16 1,979* TFLOPS), 141 GB HBM3e, NVLink 900 GB/s; DGX H200: 400 Gb/s per GPU.
    "h200": GpuSpec(name="NVIDIA H200 SXM 141GB",
                    peak={"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 67 * TERA},
                    memory_gb=141, intra_gbps=3600, inter_gbps=400,
                    source="NVIDIA H200 datasheet (SXM): sparse tensor-core figures halved"),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: FP32 19.5 TFLOPS, TF32 156 TFLOPS,
    # BF16 / FP16 312 TFLOPS (dense; 312 / 624 with sparsity); NVLink 600 GB/s (300 GB/s each way);
    # DGX A100: one 200 Gb/s ConnectX-6 (HDR InfiniBand) per GPU.
    "a100-80gb": GpuSpec(name="NVIDIA A100 SXM4 80GB",
                         peak={"bf16": 312 * TERA, "fp16": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA},
                         memory_gb=80, intra_gbps=2400, inter_gbps=200,
                         source="NVIDIA A100 datasheet (80GB SXM), dense figures"),
    # the same datasheet, A100 40GB SXM column: the same compute and links, 40 GB.
    "a100-40gb": GpuSpec(name="NVIDIA A100 SXM4 40GB",
                         peak={"bf16": 312 * TERA, "fp16": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA},
                         memory_gb=40, intra_gbps=2400, inter_gbps=200,
                         source="NVIDIA A100 datasheet (40GB SXM), dense figures"),
}
DEFAULT_GPU = "h100-sxm"
#: The achieved fraction of peak ``--time`` assumes unless told: an assumption, not a measurement
#: (benchmarks/bench_gpu.py prints the fraction it measures on a GPU).
DEFAULT_ACHIEVED_FRACTION = 0.4
DEFAULT_LATENCY_US = (5.0, 10.0)  # per message or ring step: within a node (NVLink), across nodes (InfiniBand)
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb=25
DDP_FIRST_BUCKET_BYTES = 2**20  # and its first bucket of 1 MiB (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)


def gpu_for_device(name: str) -> str | None:
    """The :data:`GPUS` preset of a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n and "pcie" not in n and "nvl" not in n:
        return "h100-sxm"
    if "a100" in n and "pcie" not in n:
        return "a100-80gb" if "80" in n else "a100-40gb"
    return None


def math_mode(dtype: str) -> str:
    """The tensor-core mode a training step of ``dtype`` runs its convolutions in: ``bf16`` under
    autocast, ``tf32`` for float32 (cuDNN's default, ``torch.backends.cudnn.allow_tf32``), ``fp32``
    otherwise."""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "tf32"}.get(dtype, "fp32")


@dataclass(frozen=True, kw_only=True, slots=True)
class Collective:
    """One collective a training step runs, as :func:`step_syncs` counts it from the model.

    Attributes
    ----------
    layer, what:
        Module path, and ``"batch_norm"``, ``"global_pool"`` or ``"head"``.
    op:
        ``"all_gather"`` or ``"all_reduce"`` (halo's small reductions are all-gathers summed
        locally, see ``halo.nn._collectives``).
    group:
        ``"world"`` (batch-norm statistics: every rank of every image) or ``"spatial"`` (the
        ranks of one image).
    phase:
        ``"forward"``, ``"recompute"`` (a checkpointed stage's forward again, during backward)
        or ``"backward"``.
    nbytes:
        The tensor this rank contributes.
    """

    layer: str
    what: str
    op: str
    group: str
    phase: str
    nbytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSyncs:
    """The synchronisations of one training step, counted from the model as planned.

    Attributes
    ----------
    halo_layers:
        Window layers that exchange a halo on this mesh (convolutions and poolings).
    halo_exchanges:
        Halo exchanges per step: each such layer once forward, again when its checkpointed
        stage is recomputed, and once backward (not for an input that needs no gradient).
    directions:
        Per direction a rank sends to (``"up"``: the previous row of ranks, ``"down"``,
        ``"left"``, ``"right"``), ``(messages, bytes)`` per step for a rank that has that
        neighbour: rows first, then columns of the row-extended block, forward and back.
    phases:
        ``batch_isend_irecv`` calls per step, the same on every rank (each exchange is a row
        phase and a column phase where that axis is sharded and the halo is wider than 0: every
        rank then sends or receives on it).
    collectives:
        Every collective of the model's forward, recompute and backward, in call order.
    """

    halo_layers: int
    halo_exchanges: int
    directions: dict
    phases: int
    collectives: tuple[Collective, ...]

    def rank_messages(self, mesh: tuple[int, int], row: int, col: int) -> tuple[int, int]:
        """``(messages, bytes)`` the rank at ``(row, col)`` sends in one step."""
        msgs = nbytes = 0
        for d in _neighbours(mesh, row, col):
            msgs += self.directions[d][0]
            nbytes += self.directions[d][1]
        return msgs, nbytes

    def count(self, *, op: str | None = None, phase: str | None = None) -> int:
        return sum(1 for c in self.collectives if (op is None or c.op == op) and (phase is None or c.phase == phase))


def _neighbours(mesh: tuple[int, int], row: int, col: int) -> list[str]:
    rows, cols = mesh
    return [d for d, ok in (("up", row > 0), ("down", row < rows - 1), ("left", col > 0), ("right", col < cols - 1))
            if ok]


def _global_mean_types() -> tuple[type, ...]:
    """Containers whose own forward takes one global mean of a block (timm's squeeze-excitation,
    ``x.mean((2, 3))``, which halo's guard routes to ``global_avg_pool2d``)."""
    try:
        from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
        from timm.models._efficientnet_blocks import SqueezeExcite
    except ImportError:
        return ()
    return SEModule, EffectiveSEModule, SqueezeExcite


def step_syncs(p: Plan, model: nn.Module, *, stride: int, data: int = 1) -> StepSyncs:
    """Count the halo exchanges, messages and collectives of one training step of ``model``
    as :func:`plan_model` planned it (``p``), on a world of ``data`` images of ``p.mesh`` ranks.

    Halo traffic comes from the plan's window layers (their halo widths and
    :attr:`LayerPlan.exchanges`). Collectives follow halo's layers: a training-mode batch norm
    all-gathers ``(count, mean, var)`` over the world forward and ``(sum dy, sum dy xhat)``
    backward; a global average pooling (``AdaptiveAvgPool2d``, a mean head, timm's
    squeeze-excitation) all-gathers ``N x C`` each way; a global max pooling (``AdaptiveMaxPool2d``,
    a max head) gathers values and positions and sums, one gather back; the attention head
    all-reduces its maximum and gathers its sums, one gather back; the top-k head all-gathers
    values and positions and all-reduces back. A stage that is checkpointed runs its forward's
    collectives again in backward. None run on a world of one rank; the spatial ones none on a
    1 x 1 mesh. Compared with an instrumented gloo run in tests/test_plan_time.py.
    """
    from halo.nn.heads import GatedAttentionHead, MaxHead, MeanHead, TopKHead

    rows, cols = p.mesh
    spatial, world = rows * cols, rows * cols * data
    eb = DTYPE_BYTES[p.dtype]
    sb = 8 if p.dtype == "float64" else 4  # batch-norm statistics: float32 for half-precision blocks
    modules = dict(model.named_modules())
    segment = _segments(model) if p.checkpointing else {}
    directions = {d: [0, 0] for d in ("up", "down", "left", "right")}
    halo_layers = exchanges = phases = 0
    out: list[Collective] = []

    def add(layer: str, what: str, op: str, group: str, phases_: Sequence[str], nbytes: int) -> None:
        if (world if group == "world" else spatial) > 1:
            out.extend(Collective(layer=layer, what=what, op=op, group=group, phase=ph, nbytes=int(nbytes))
                       for ph in phases_)

    for l in p.layers:
        m = modules.get(l.name if l.name != "(model)" else "")
        if l.halo is not None:
            top, bottom, left, right = l.halo
            n, c, bh, bw = l.in_shape
            eh, bottom, right = bh + top + bottom, max(bottom, 0), max(right, 0)
            fwd, bwd = l.exchanges
            axes = (rows > 1 and (top > 0 or bottom > 0)) + (cols > 1 and (left > 0 or right > 0))
            if axes:  # a halo that only trims (a strided 1 x 1 convolution) sends nothing
                halo_layers += 1
                exchanges += fwd + bwd
                phases += (fwd + bwd) * axes
            per = n * c * eb
            for d, (f_width, b_width, length) in {"up": (bottom, top, bw), "down": (top, bottom, bw),
                                                  "left": (right, left, eh), "right": (left, right, eh)}.items():
                directions[d][0] += fwd * (f_width > 0) + bwd * (b_width > 0)
                directions[d][1] += per * length * (fwd * f_width + bwd * b_width)
        if m is None or len(l.in_shape) != 4:
            continue
        again = ("forward", "recompute") if l.name in segment else ("forward",)
        n, c = l.in_shape[:2]
        if _kind(m) == "bn" and m.training:
            add(l.name, "batch_norm", "all_gather", "world", again, (2 * c + 1) * sb)
            add(l.name, "batch_norm", "all_gather", "world", ("backward",), 2 * c * sb)
        elif isinstance(m, nn.AdaptiveAvgPool2d) or (isinstance(m, _global_mean_types()) and l.type == type(m).__name__):
            add(l.name, "global_pool", "all_gather", "spatial", again + ("backward",), n * c * eb)
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            for nb in (n * c * eb, n * c * 8, n * c * eb):  # values, positions, the owner's sum
                add(l.name, "global_pool", "all_gather", "spatial", again, nb)
            add(l.name, "global_pool", "all_gather", "spatial", ("backward",), n * c * eb)
    seen = {l.name for l in p.layers}
    for name, m in model.named_modules():  # containers whose functional global means the plan may not list
        if isinstance(m, _global_mean_types()) and name not in seen:
            n, c = p.batch, next(q for q in m.modules() if isinstance(q, nn.Conv2d)).in_channels
            again = ("forward", "recompute") if name in segment else ("forward",)
            add(name, "global_pool", "all_gather", "spatial", again + ("backward",), n * c * eb)
    h, w = p.block[0] // stride, p.block[1] // stride
    for name, m in model.named_modules():  # slide heads pool the trunk's feature map (never checkpointed)
        n = p.batch
        if isinstance(m, MeanHead):
            c = m.fc.in_features
            add(name, "head", "all_gather", "spatial", ("forward", "backward"), n * c * eb)
        elif isinstance(m, MaxHead):
            c = m.fc.in_features
            for nb in (n * c * eb, n * c * 8, n * c * eb):
                add(name, "head", "all_gather", "spatial", ("forward",), nb)
            add(name, "head", "all_gather", "spatial", ("backward",), n * c * eb)
        elif isinstance(m, GatedAttentionHead):
            c = m.fc.in_features
            add(name, "head", "all_reduce", "spatial", ("forward",), n * eb)  # the maximum score
            add(name, "head", "all_gather", "spatial", ("forward", "backward"), n * (c + 1) * eb)
        elif isinstance(m, TopKHead):
            classes = m.score.out_channels
            width = min(m.k, h * w) * (2 if m.min_max else 1)
            add(name, "head", "all_gather", "spatial", ("forward",), n * classes * width * eb)
            add(name, "head", "all_gather", "spatial", ("forward",), n * classes * width * 8)
            add(name, "head", "all_reduce", "spatial", ("backward",), spatial * n * classes * width * eb)
    order = {"forward": 0, "recompute": 1, "backward": 2}
    out.sort(key=lambda c: order[c.phase])  # stable: call order within the forward
    return StepSyncs(halo_layers=halo_layers, halo_exchanges=exchanges,
                     directions={d: tuple(v) for d, v in directions.items()}, phases=phases,
                     collectives=tuple(out))


@dataclass(frozen=True, kw_only=True, slots=True)
class TimeAssumptions:
    """What ``--time`` assumes; every field is printed (see :func:`estimate_time`)."""

    gpu: str
    gpu_name: str
    math: str
    peak_flops: float
    peak_source: str
    achieved_fraction: float
    achieved_fraction_measured: bool
    intra_gbps: float
    inter_gbps: float
    latency_us: tuple[float, float]
    gpus_per_node: int
    data: int
    accumulate: int
    overlap: bool


def _ring(op: str, ranks: int, nbytes: float, latency: float, bandwidth: float) -> tuple[int, float, float]:
    """``(messages, bytes sent, seconds)`` of a ring ``op`` over ``ranks`` on one rank: all-gather
    of ``nbytes`` per rank, ``P - 1`` steps of ``nbytes``; all-reduce of ``nbytes``, reduce-scatter
    then all-gather, ``2 (P - 1)`` steps of ``nbytes / P``; broadcast, pipelined, ``P - 1`` steps
    and ``nbytes`` once."""
    if ranks <= 1:
        return 0, 0.0, 0.0
    if op == "all_gather":
        steps, sent = ranks - 1, (ranks - 1) * nbytes
    elif op == "all_reduce":
        steps, sent = 2 * (ranks - 1), 2 * (ranks - 1) / ranks * nbytes
    elif op == "broadcast":
        steps, sent = ranks - 1, nbytes
    else:
        raise ValueError(op)
    return steps, sent, steps * latency + sent / bandwidth


def estimate_time(p: Plan, syncs: StepSyncs, a: TimeAssumptions, *, buffer_bytes: int = 0,
                  cohort: int | None = None, epochs: int = 1) -> dict:
    """Seconds per training step, per epoch and for ``epochs`` passes over ``cohort`` slides.

    - compute: ``flops_per_rank`` (forward + backward, and the recompute with checkpointing;
      every rank's block is the same size) over ``peak_flops * achieved_fraction``;
    - halo: for every rank, each message it sends costs the latency of its link plus its bytes
      over the link's bandwidth, messages one after another; a neighbour is on the same node when
      the two global ranks (row-major within an image, images one after another) fall in the same
      ``gpus_per_node`` block, else across the network; the step waits for the slowest rank;
    - syncs: batch-norm all-gathers over the world, global-pool and head collectives over the
      image's ranks (:func:`step_syncs`), the training loop's per-step all-reduce (which image
      groups read their slide) and DDP's broadcast of the buffers from rank 0 before each forward,
      as ring collectives (``P - 1`` or ``2 (P - 1)`` steps, each a latency); a group spanning
      nodes runs at the network's latency and bandwidth;
    - gradients: DDP's ring all-reduce of the float32 gradients (``param_bytes``) over the whole
      world (halo-train wraps the model in DDP over every rank), in 25 MiB buckets (the first
      1 MiB), once per ``accumulate`` steps;
    - total: the sum (no overlap of communication with computation: an upper bound), or with
      ``overlap`` the larger of compute and all communication (a lower bound).
    """
    rows, cols = p.mesh
    spatial = rows * cols
    world = spatial * a.data
    gpn = a.gpus_per_node
    lat = {"intra": a.latency_us[0] * 1e-6, "inter": a.latency_us[1] * 1e-6}
    bw = {"intra": a.intra_gbps * 1e9 / 8, "inter": a.inter_gbps * 1e9 / 8}
    compute = p.flops_per_rank / (a.peak_flops * a.achieved_fraction)

    step = {"up": -cols, "down": cols, "left": -1, "right": 1}
    worst = (0.0, (0, 0), 0, 0, {"intra": 0, "inter": 0})
    for d_index in range(a.data):
        for i, j in itertools.product(range(rows), range(cols)):
            g = d_index * spatial + i * cols + j
            t, msgs, nbytes, links = 0.0, 0, 0, {"intra": 0, "inter": 0}
            for d in _neighbours(p.mesh, i, j):
                link = "intra" if g // gpn == (g + step[d]) // gpn else "inter"
                m, b = syncs.directions[d]
                t += m * lat[link] + b / bw[link]
                msgs, nbytes = msgs + m, nbytes + b
                links[link] += m
            if t > worst[0]:
                worst = (t, (i, j), msgs, nbytes, links)
    halo_s, halo_rank, halo_msgs, halo_bytes, halo_links = worst

    def spans(group_size: int) -> str:
        starts = range(0, world, group_size)
        return "inter" if any(s // gpn != (s + group_size - 1) // gpn for s in starts) else "intra"

    groups = {"world": (world, spans(world)), "spatial": (spatial, spans(spatial))}
    sync = {"batch_norm": [0, 0, 0.0], "global_pool": [0, 0, 0.0], "head": [0, 0, 0.0], "loop": [0, 0, 0.0],
            "ddp_buffers": [0, 0, 0.0]}
    for c in syncs.collectives:
        ranks, link = groups[c.group]
        m, b, t = _ring(c.op, ranks, c.nbytes, lat[link], bw[link])
        s = sync[c.what]
        s[0], s[1], s[2] = s[0] + 1, s[1] + m, s[2] + t
    wlink = groups["world"][1]
    for what, op, nbytes in (("loop", "all_reduce", 4 * a.data), ("ddp_buffers", "broadcast", buffer_bytes)):
        if world > 1 and (what == "loop" or nbytes > 0):
            m, b, t = _ring(op, world, nbytes, lat[wlink], bw[wlink])
            sync[what] = [1, m, t]
    sync_s = sum(s[2] for s in sync.values())
    grad_bytes = p.grad_bytes
    buckets = 0 if world == 1 else 1 + -(-max(grad_bytes - DDP_FIRST_BUCKET_BYTES, 0) // DDP_BUCKET_BYTES)
    grad_msgs = grad_sent = 0
    grad_s = 0.0
    if world > 1:
        _, grad_sent, t_bytes = _ring("all_reduce", world, grad_bytes, 0.0, bw[wlink])
        grad_msgs = buckets * 2 * (world - 1)
        grad_s = (t_bytes + grad_msgs * lat[wlink]) / a.accumulate
    comm = halo_s + sync_s + grad_s
    total = max(compute, comm) if a.overlap else compute + comm
    steps = None if cohort is None else -(-cohort // (a.data * p.batch))
    epoch = None if steps is None else steps * total
    return {
        "assumptions": {**asdict(a), "latency_us": list(a.latency_us),
                        "node_placement": "ranks fill nodes of gpus_per_node in rank order (row-major within an "
                                          "image, images one after another)",
                        "overlap_note": ("communication fully overlapped with compute (a lower bound)" if a.overlap
                                         else "no overlap of communication with compute (an upper bound)"),
                        "collectives": "ring: all-gather P-1 steps, all-reduce 2(P-1) steps, one latency each",
                        "not_counted": "reading slides, the optimizer step, kernel launch gaps, stragglers"},
        "fits": p.fits,
        "world_size": world,
        "nodes": -(-world // gpn),
        "spatial_group_link": groups["spatial"][1],
        "world_link": wlink,
        "flops_per_rank": p.flops_per_rank,
        "compute_s": compute,
        "halo": {"layers": syncs.halo_layers, "exchanges_per_step": syncs.halo_exchanges,
                 "phases_per_step": syncs.phases, "rank": list(halo_rank),
                 "messages_per_step": halo_msgs, "messages_by_link": halo_links, "bytes_per_step": halo_bytes,
                 "seconds": halo_s},
        "syncs": {k: {"collectives": v[0], "messages": v[1], "seconds": v[2]} for k, v in sync.items()},
        "collectives_per_step": sum(v[0] for v in sync.values()),
        "sync_s": sync_s,
        "grad_allreduce": {"bytes": grad_bytes, "buckets": buckets, "messages": grad_msgs, "bytes_sent": grad_sent,
                           "seconds": grad_s},
        "communication_s": comm,
        "total_s_per_step_no_overlap": compute + comm,
        "total_s_per_step_overlap": max(compute, comm),
        "total_s_per_step": total,
        "batch": p.batch, "cohort": cohort, "epochs": epochs, "steps_per_epoch": steps,
        "s_per_epoch": epoch, "total_s": None if epoch is None else epoch * epochs,
    }


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s:.4g} s ({s / 60:.1f} min)"
    if s < 2 * 86400:
        return f"{s:.4g} s ({s / 3600:.1f} h)"
    return f"{s:.4g} s ({s / 86400:.1f} days)"


def cohort_time(times: Sequence[dict], *, epochs: int = 1) -> dict:
    """Seconds per epoch and in all over slides of different sizes: ``times`` is each slide's
    :func:`estimate_time` (one step at its own size, the same assumptions). An epoch is the
    ``ceil(N / (data * batch))`` steps over the ``N`` slides, each at the mean of the slides' step
    times: with one image group and batch 1, the sum of the slides' step times."""
    if not times:
        raise ValueError("no slides to time")
    a = times[0]["assumptions"]
    batch = times[0]["batch"]
    n = len(times)
    per_step = [t["total_s_per_step"] for t in times]
    mean = sum(per_step) / n
    steps = -(-n // (a["data"] * batch))
    epoch = steps * mean
    return {"assumptions": a, "cohort": n, "epochs": epochs, "steps_per_epoch": steps, "batch": batch,
            "mean_s_per_step": mean, "min_s_per_step": min(per_step), "max_s_per_step": max(per_step),
            "s_per_epoch": epoch, "total_s": epoch * epochs,
            "epoch_note": "each slide's step timed at its own padded region; an epoch is ceil(slides / (data x "
                          "batch)) steps at the mean step time (one image group, batch 1: the sum over the slides)"}


def _print_assumptions(t: dict) -> None:
    a = t["assumptions"]
    measured = "measured" if a["achieved_fraction_measured"] else "ASSUMED, not measured"
    print(f"time (--time): assumptions, all explicit")
    print(f"  accelerator             {a['gpu']} ({a['gpu_name']}), {a['math']} peak {a['peak_flops'] / 1e12:.1f} "
          f"TFLOP/s dense ({a['peak_source']})")
    print(f"  achieved fraction       {a['achieved_fraction']:g} of peak ({measured}) -> "
          f"{a['peak_flops'] * a['achieved_fraction'] / 1e12:.1f} TFLOP/s")
    print(f"  links                   within a node {a['intra_gbps']:g} Gb/s ({a['intra_gbps'] / 8:g} GB/s) each way, "
          f"latency {a['latency_us'][0]:g} us; across nodes {a['inter_gbps']:g} Gb/s ({a['inter_gbps'] / 8:g} GB/s), "
          f"latency {a['latency_us'][1]:g} us (per message or ring step)")
    print(f"  placement               {t['world_size']} ranks ({a['data']} image group(s) x mesh) on {t['nodes']} "
          f"node(s) of {a['gpus_per_node']} GPUs, {a['node_placement']}; an image's ranks: "
          f"{'one node' if t['spatial_group_link'] == 'intra' else 'several nodes'}")
    print(f"  overlap                 {a['overlap_note']}")
    print(f"  collectives             {a['collectives']}; DDP gradient all-reduce over all {t['world_size']} ranks "
          f"in 25 MiB buckets, every {a['accumulate']} step(s)")
    print(f"  not counted             {a['not_counted']}")
    h = t["halo"]
    print(f"  synchronisations counted from the model: {h['layers']} layers with a halo, {h['exchanges_per_step']} "
          f"halo exchanges per step ({h['phases_per_step']} row and column phases on every rank), "
          f"{t['collectives_per_step']} collectives per step")


def _print_time(t: dict) -> None:
    _print_assumptions(t)
    a = t["assumptions"]
    h = t["halo"]
    print(f"  {'compute':30s} {t['compute_s']:10.4f} s   {t['flops_per_rank'] / 1e12:.2f} TFLOP per rank")
    print(f"  {'halo exchange':30s} {h['seconds']:10.4f} s   rank {h['rank'][0]},{h['rank'][1]}: {h['messages_per_step']} "
          f"messages ({h['messages_by_link']['intra']} within a node, {h['messages_by_link']['inter']} across), "
          f"{_fmt(h['bytes_per_step'])}")
    s = t["syncs"]
    detail = ", ".join(f"{k.replace('_', ' ')} {v['collectives']} ({v['seconds'] * 1e3:.2f} ms)" for k, v in s.items()
                       if v["collectives"])
    print(f"  {'BN / pool / head syncs':30s} {t['sync_s']:10.4f} s   {detail or 'none'}")
    g = t["grad_allreduce"]
    print(f"  {'gradient all-reduce':30s} {g['seconds']:10.4f} s   {_fmt(g['bytes'])} in {g['buckets']} bucket(s), "
          f"{_fmt(g['bytes_sent'])} sent per rank")
    print(f"  {'total per step':30s} {t['total_s_per_step']:10.4f} s   "
          f"({'overlapped' if a['overlap'] else 'no overlap'}; "
          f"{'no overlap' if a['overlap'] else 'full overlap'} would be "
          f"{t['total_s_per_step_no_overlap' if a['overlap'] else 'total_s_per_step_overlap']:.4f} s)")
    if not t["fits"]:
        print("  note: this configuration does not fit the GPU memory above (try --checkpointing or a larger "
              "mesh); the times are for it as planned")
    if t["cohort"] is None:
        print("  per epoch: give --cohort N (slides)")
        return
    _print_epoch(t)


def _print_epoch(t: dict, note: str = "") -> None:
    a = t["assumptions"]
    print(f"  {'per epoch':30s} {_duration(t['s_per_epoch'])}   {t['steps_per_epoch']} steps for {t['cohort']} slides "
          f"({a['data']} image group(s)){note}")
    print(f"  {'total':30s} {_duration(t['total_s'])}   {t['epochs']} epoch(s)")


def _print_slide_times(times: Sequence[tuple[str, dict]], total: dict) -> None:
    """``--time`` with ``--slide`` / ``--csv``: the assumptions once, then each slide's step in the
    terms of :func:`_print_time`, then the epoch over the slides (:func:`cohort_time`)."""
    _print_assumptions(times[0][1])
    width = max(len(k) for k, _ in times)
    for key, t in times:
        print(f"  {key:{width}s}  compute {t['compute_s']:.4f} s  halo exchange {t['halo']['seconds']:.4f} s  "
              f"BN / pool / head syncs {t['sync_s']:.4f} s  gradient all-reduce "
              f"{t['grad_allreduce']['seconds']:.4f} s  total per step {t['total_s_per_step']:.4f} s"
              + ("" if t["fits"] else "  (does not fit)"))
    a = total["assumptions"]
    print(f"  {'step':30s} {total['mean_s_per_step']:10.4f} s   mean over the {total['cohort']} slides "
          f"({total['min_s_per_step']:.4f} to {total['max_s_per_step']:.4f} s; "
          f"{'overlapped' if a['overlap'] else 'no overlap'})")
    _print_epoch(total, f", the slides' own step times{'' if (a['data'], total['batch']) == (1, 1) else ' (mean)'}")


# -- slides: the padded region training reads, planned by the training data path ------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class SlidePlan:
    """One slide's padded region (as ``halo.data.SlideDataset`` plans it for training) and the
    memory plan of one training step on it. Sizes are ``(height, width)``."""

    key: str
    path: str
    level: int
    mpp: float | None
    padded_hw: tuple[int, int]
    block_hw: tuple[int, int]
    content_hw: tuple[int, int]
    plan: Plan

    def summary(self) -> dict:
        p = self.plan.summary()
        return {"slide": self.key, "path": self.path, "level": self.level, "mpp": self.mpp,
                "padded_hw": list(self.padded_hw), "block_hw": list(self.block_hw),
                "tissue_hw": list(self.content_hw), "mesh": p["mesh"],
                **{k: p[k] for k in ("activation_bytes_per_rank", "total_bytes_per_rank", "halo_bytes_per_step_per_rank",
                                     "param_bytes", "flops_per_rank", "gpu_memory_bytes", "fits")}}


@functools.cache
def _halo_plan_words(text: str) -> str:
    """A ``halo.data`` message in halo-plan's words: ``data.columns.X=`` is ``--columns X=``."""
    return re.sub(r"data\.columns\.(\w+)=", r"--columns \1=", text)


class _Cohort:
    """The slides to plan, read by ``halo.data.SlideDataset`` (the class training uses, so that the
    CSV's delimiter and headers, level choice, tissue box and padding are training's own), as
    ``halo-train`` builds it for prediction: ``labels_required=False``, ``derive_split=False``,
    ``columns`` (data.columns) from ``--columns``; labels are not read (``read_labels=False``).
    ``--csv`` is read where it is; ``--slide`` paths become a one-column manifest in a temporary
    folder, and messages name each slide as given, never that manifest."""

    def __init__(self, *, slides: Sequence[str] | None, csv_path: str | None, root: str | None,
                 columns: dict[str, str] | None = None) -> None:
        import csv
        import os
        import tempfile

        self._tmp = None
        self.root = root
        self.columns = dict(columns or {})
        if slides is not None:
            seen: dict[str, str] = {}
            for s in slides:
                if not s.strip():
                    raise ValueError("--slide: an empty path")
                real = os.path.realpath(s)
                if real in seen:
                    raise ValueError(f"--slide {s}: the same file as {seen[real]}; give each slide once")
                seen[real] = s
            self._tmp = tempfile.TemporaryDirectory(prefix="halo-plan-")
            self.keys = list(slides)
            self.csv = os.path.join(self._tmp.name, "slides.csv")
            with open(self.csv, "w", newline="") as fh:
                wr = csv.writer(fh)
                wr.writerow(["slide"])
                wr.writerows([os.path.abspath(s)] for s in slides)
            self.columns = {}
            return
        self.keys = None
        self.csv = csv_path
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"--csv {csv_path}: no such file")

    def dataset(self, grid: tuple[int, int], multiple: int, mpp: float | None, level: int | None, tissue):
        from halo.data import SlideDataset

        return SlideDataset(
            self.csv, ["slide"], grid=grid, multiple=multiple, mpp=mpp, level=level, split=None, strict=False,
            root=self.root, record_dir=None, tissue=tissue, labels_required=False, read_labels=False, derive_split=False,
            columns=self.columns or None, report=False, validate=False)

    def problem(self, e: Exception) -> str:
        """A ``halo.data.ManifestError`` as halo-plan says it: the user's CSV (or ``--slide``) named,
        halo-plan's own options suggested."""
        text = _halo_plan_words(str(e))
        if self._tmp is not None:
            text = text.replace(self.csv, "--slide")
        return text

    def key(self, ds, i: int) -> str:
        return self.keys[i] if self.keys is not None else ds.rows[i].slide_id

    def ref(self, ds, i: int) -> str:
        """How a problem names row ``i``: ``halo.data.slide_ref`` (CSV line, key, path) for --csv; for
        --slide (whose manifest is halo-plan's own) the slide as given, then its path where that
        differs (a relative path given)."""
        from halo.data import slide_ref

        r = ds.rows[i]
        if self.keys is None:
            return slide_ref(r.line, r.slide_id, r.path)
        key = self.keys[i]
        return f"slide {key!r}" if key == r.path else f"slide {key!r} ({r.path})"

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def plan_slide(region, *, key: str, model: nn.Module, name: str, traced: Trace, **kwargs) -> SlidePlan:
    """:func:`plan_model` on the padded region of a ``halo.data.RegionPlan``."""
    w, h = region.padded_size  # halo.data's sizes are (width, height)
    rows, cols = region.grid
    p = plan_model(model, name=name, image=(h, w), mesh=(rows, cols), mpp=region.mpp, traced=traced, **kwargs)
    if p.padded_image != (h, w):  # the data path pads to multiples of rows and cols times the stride
        raise AssertionError(f"{region.path}: planned {p.padded_image}, the data path reads {(h, w)}")
    (_, _), (cw, ch) = region.content
    return SlidePlan(key=key, path=region.path, level=region.level, mpp=region.mpp, padded_hw=(h, w),
                     block_hw=region.block_shape(), content_hw=(ch, cw), plan=p)


def _tissue(items: Sequence[str]):
    """``KEY=VALUE`` pairs as :class:`halo.data.TissueOptions` (None: its defaults, as training's)."""
    import dataclasses

    from halo.data import TissueOptions

    if not items:
        return None
    fields = {f.name: f for f in dataclasses.fields(TissueOptions)}
    defaults = TissueOptions()
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--tissue {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        kind = type(getattr(defaults, key))
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--tissue {item!r}: {key} is true or false")
            kwargs[key] = text.lower() in ("true", "1", "yes")
        else:
            kwargs[key] = kind(text)
    return TissueOptions(**kwargs)


def _columns(items: Sequence[str]) -> dict[str, str]:
    """``--columns COLUMN=HEADER`` pairs as ``halo.data.SlideDataset``'s ``columns`` (data.columns)."""
    from halo.data.dataset import COLUMNS

    columns: dict[str, str] = {}
    for item in items:
        key, sep, header = item.partition("=")
        key = key.strip()
        if not sep or key not in COLUMNS or not header.strip():
            raise ValueError(f"--columns {item}: expected COLUMN=HEADER with COLUMN one of {list(COLUMNS)} "
                             f"(data.columns.COLUMN) and HEADER a header of the CSV")
        if key in columns:
            raise ValueError(f"--columns {item}: {key} is named twice")
        columns[key] = header
    return columns


def _slide_line(s: SlidePlan, width: int) -> str:
    h, w = s.padded_hw
    bh, bw = s.block_hw
    mpp = f"{s.mpp:.3f} mpp" if s.mpp is not None else "no mpp"
    fits = "fits" if s.plan.fits else "does not fit"
    return (f"  {s.key:{width}s}  level {s.level}  {mpp}  padded {h} x {w}  block {bh} x {bw}  "
            f"peak {_fmt(s.plan.total_bytes_per_rank)} per rank  {fits}")


def _default_note(a: argparse.Namespace, name: str) -> str:
    """`` (halo-train's default)`` when ``name`` was not given but taken from :func:`train_defaults`."""
    return " (halo-train's default)" if name in getattr(a, "defaulted", ()) else ""


def _resolution_note(a: argparse.Namespace) -> str:
    """Which resolution slides are planned at, and whether that is halo-train's default."""
    if a.mpp is None:
        level = a.level if a.level is not None else 0
        return f"read at level {level} (data.mpp=null, data.level{'' if a.level is not None else ' unset: level 0'})"
    default = ", halo-train's default" if "mpp" in a.defaulted else ""
    fallback = (f", level {a.level} for slides without a usable mpp (data.level)" if a.level is not None
                else "; slides without a usable mpp need an mpp or level column, or --level")
    return f"read at {a.mpp:g} mpp (data.mpp{default}){fallback}"


def _plan_slides(a, p: argparse.ArgumentParser, model: nn.Module, traced: Trace) -> int:
    """``--slide`` / ``--csv``: one line per slide, then the smallest square mesh for the largest."""
    import os

    from halo.data import ManifestError, SlideError, SlideOpenError, SlideReadError, SlideTooSmallError

    try:
        tissue = _tissue(a.tissue)
        cohort = _Cohort(slides=a.slide, csv_path=a.csv, root=a.root, columns=_columns(a.columns))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    kwargs = dict(dtype=a.dtype, batch=a.batch, checkpointing=a.checkpointing, gpu_memory=a.gpu_memory * GB)
    mesh = tuple(a.mesh)
    try:
        try:
            ds = cohort.dataset(mesh, traced.stride, a.mpp, a.level, tissue)
        except ManifestError as e:
            print(f"halo-plan: {cohort.problem(e)}", file=sys.stderr)
            return 2
        planned: list[tuple[int, SlidePlan]] = []
        failed: list[dict] = []  # key, path, why, how named, CSV line, unreadable, reader
        for i in range(len(ds)):
            key = cohort.key(ds, i)
            try:
                ds.verify(i)  # training's start-up check first: a corrupt slide is unreadable, not too small
                planned.append((i, plan_slide(ds.plan(i), key=key, model=model, name=a.model, traced=traced,
                                              **kwargs)))
            except (SlideError, FileNotFoundError) as e:
                why = str(e)
                path = getattr(e, "path", None)
                if path and why.startswith(f"{path}: "):  # the line names the slide already
                    why = why[len(path) + 2:]
                unreadable = isinstance(e, (SlideOpenError, SlideReadError)) and os.path.exists(ds.rows[i].path)
                failed.append({"key": key, "path": ds.rows[i].path, "why": f"{type(e).__name__}: {why}",
                               "ref": cohort.ref(ds, i), "unreadable": unreadable,
                               "reader": getattr(e, "reader", None),
                               "line": None if cohort.keys is not None else ds.rows[i].line})
        largest = max(planned, key=lambda ip: ip[1].content_hw[0] * ip[1].content_hw[1], default=None)
        smallest: dict | None = None
        if largest is not None:
            index, big = largest
            smallest = {"slide": big.key, "tissue_hw": list(big.content_hw), "n": None}
            for n in range(1, a.max_mesh + 1):
                try:
                    s = plan_slide(cohort.dataset((n, n), traced.stride, a.mpp, a.level, tissue).plan(index),
                                   key=big.key, model=model, name=a.model, traced=traced, **kwargs)
                except SlideTooSmallError as e:
                    smallest["reason"] = f"at {n} x {n} the slide is smaller than the grid: {e}"
                    break
                except SlideError as e:  # read once already; a reread that fails is said, not a traceback
                    smallest["reason"] = f"at {n} x {n} the slide cannot be planned: {type(e).__name__}: {e}"
                    break
                if s.plan.fits:
                    smallest.update(n=n, block_hw=list(s.block_hw), padded_hw=list(s.padded_hw),
                                    total_bytes_per_rank=s.plan.total_bytes_per_rank)
                    break
            else:
                smallest["reason"] = f"no square mesh up to {a.max_mesh} x {a.max_mesh} fits"
        times = [(s.key, _time_plan(a, s.plan, model, traced)) for _, s in planned] if a.time else []
        total = cohort_time([t for _, t in times], epochs=a.epochs) if times else None
    finally:
        cohort.close()
    if a.json:
        out = {"model": a.model, "head": a.head, "total_stride": traced.stride, "mesh": list(mesh),
               "mpp": a.mpp, "level": a.level, "defaults_from_halo_train": list(a.defaulted),
               "dtype": a.dtype, "batch": a.batch, "checkpointing": a.checkpointing,
               "gpu_memory_bytes": int(a.gpu_memory * GB), "sizes": "height, width",
               "slides": [{**s.summary(), **({"time": t} if a.time else {})}
                          for (_, s), (_, t) in itertools.zip_longest(planned, times, fillvalue=(None, None))]
               + [{"slide": f["key"], "path": f["path"], "error": f["why"], "unreadable": f["unreadable"],
                   "reader": f["reader"], **({"csv_line": f["line"]} if f["line"] is not None else {})}
                  for f in failed],
               "smallest_square_mesh": smallest}
        if a.time:
            out["time"] = total
        print(json.dumps(out, indent=2))
        return 1 if failed else 0
    print(f"halo-plan: {a.model}{_default_note(a, 'model')} with a {a.head} head (total stride {traced.stride}) on a {mesh[0]} x {mesh[1]} mesh"
          f"{_default_note(a, 'mesh')}, batch {a.batch}, {a.dtype}{', checkpointing' if a.checkpointing else ''}, "
          f"{a.gpu_memory:g} GB per GPU; {_resolution_note(a)}; sizes are H x W (height x width) pixels at the level "
          f"read")
    width = max([len(s.key) for _, s in planned] + [1])
    for _, s in planned:
        print(_slide_line(s, width))
    for f in failed:
        what = "unreadable or corrupt file: " if f["unreadable"] else ""
        print(f"  {f['ref']}: cannot plan: {what}{f['why']}")
    if smallest is not None:
        th, tw = smallest["tissue_hw"]
        head = f"smallest square mesh for the largest slide ({smallest['slide']}, tissue {th} x {tw})"
        if smallest["n"] is not None:
            n, (bh, bw) = smallest["n"], smallest["block_hw"]
            print(f"{head}: {n} x {n}, block {bh} x {bw}, peak {_fmt(smallest['total_bytes_per_rank'])} per rank")
        else:
            print(f"{head}: none; {smallest['reason']}")
    if total is not None:
        _print_slide_times(times, total)
    elif a.time:
        print("time (--time): no slide could be planned")
    return 1 if failed else 0


TRAIN_DEFAULTS = ("model", "mesh", "head", "num_classes", "checkpointing", "mpp", "level")
"""The flags whose defaults are halo-train's (:func:`train_defaults`), not restated here."""


@functools.cache
def train_defaults() -> dict:
    """What ``halo-train`` uses when not told otherwise, for the flags halo-plan shares with it.

    Composed as ``halo-train data=csv`` composes its config (``conf/config.yaml`` over the typed
    schema of :mod:`halo.train.config`; your slides are read with ``data=csv``), so that a plan
    made with defaults is of the model, regions and mesh a training run with defaults reads. Keys:
    ``model`` (``model.name``), ``mesh`` ``(rows, cols)``, ``head``, ``num_classes``, ``checkpointing``, ``mpp``, ``level``
    and ``source`` (where they came from). Outside a usable config directory (or inside another
    Hydra application) the schema's dataclass defaults are used.
    """
    from omegaconf import OmegaConf

    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from halo.train import CONF_DIR

        if GlobalHydra.instance().is_initialized():
            raise ValueError("Hydra is initialised already")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["data=csv"])
        source = "halo-train data=csv (conf/config.yaml)"
    except Exception:  # noqa: BLE001 - no conf/ here: the schema alone
        from halo.train.config import Config

        cfg, source = OmegaConf.structured(Config), "halo.train.config's schema"
    return {"model": str(cfg.model.name), "mesh": (int(cfg.mesh.rows), int(cfg.mesh.cols)),
            "head": str(cfg.head.name),
            "num_classes": int(cfg.model.num_classes), "checkpointing": bool(cfg.train.checkpointing),
            "mpp": None if cfg.data.mpp is None else float(cfg.data.mpp),
            "level": None if cfg.data.level is None else int(cfg.data.level), "source": source}


def _mpp_arg(text: str) -> float | None:
    """``--mpp``: microns per pixel, or ``none`` / ``null`` (``data.mpp=null``: read --level)."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not microns per pixel (a number, or none)") from None


_UNSET = object()


def _parser() -> argparse.ArgumentParser:
    """The ``halo-plan`` argument parser; the flags of :data:`TRAIN_DEFAULTS` default to unset
    (:func:`parse_args` fills them from :func:`train_defaults`)."""
    from halo.models import HEADS

    d = train_defaults()
    p = argparse.ArgumentParser(
        prog="halo-plan", description=__doc__.splitlines()[0],
        epilog="Sizes are HEIGHT then WIDTH, as arrays are ((N, C, H, W); halo.data's own sizes are (width, height)) "
               "and output prints them as H x W. The model is what halo-train builds: "
               "halo.models.build_classifier(MODEL, NUM_CLASSES, head=HEAD). Slides are planned by "
               "halo.data.SlideDataset, as training plans them: same level, tissue box and padding.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs=2, type=int, metavar=("HEIGHT", "WIDTH"),
                     help="plan an image of HEIGHT x WIDTH pixels (height first)")
    src.add_argument("--slide", nargs="+", metavar="PATH", help="plan the padded tissue region of each slide")
    src.add_argument("--csv", metavar="COHORT.csv",
                     help="plan every slide of a manifest, read as halo-train reads data.csv (delimiter , ; tab or "
                          "|; headers matched by halo.data.ALIASES or --columns; relative paths from the CSV's "
                          "folder; labels, if any, are not read)")
    p.add_argument("--model", default=_UNSET,
                   help=f"model.name as halo-train takes it: halo_tiny[_WIDTH], a torchvision name (resnet50) "
                        f"or timm:<name> (default halo-train's: {d['model']})")
    p.add_argument("--head", choices=HEADS, default=_UNSET,
                   help=f"head.name (default halo-train's: {d['head']})")
    p.add_argument("--num-classes", type=int, default=_UNSET,
                   help=f"model.num_classes (default halo-train's: {d['num_classes']})")
    p.add_argument("--mesh", nargs=2, type=int, default=_UNSET, metavar=("ROWS", "COLS"),
                   help=f"ranks per image: mesh.rows mesh.cols (default halo-train's: {d['mesh'][0]} {d['mesh'][1]})")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpointing", action="store_const", const=True, default=_UNSET,
                   help=f"recompute each trunk stage in backward, as train.checkpointing does (default "
                        f"halo-train's: {str(d['checkpointing']).lower()})")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory budget per GPU in GB (default 80, an H100; with --gpu, that GPU's memory)")
    p.add_argument("--mpp", type=_mpp_arg, default=_UNSET,
                   help=f"with --slide/--csv: microns per pixel to train at (data.mpp; default halo-train's: "
                        f"{d['mpp']}; none: every slide at --level, else level 0); with --image: only reports the "
                        f"field of view (default none)")
    p.add_argument("--level", type=int, default=_UNSET,
                   help=f"pyramid level for slides without a usable mpp, or every slide with --mpp none "
                        f"(data.level; default halo-train's: {d['level']})")
    p.add_argument("--root", default=None, help="folder relative slide paths of --csv resolve against "
                                               "(data.root; default the CSV's folder)")
    p.add_argument("--columns", nargs="+", default=[], metavar="COLUMN=HEADER",
                   help="with --csv: the header read as each column, where halo.data.ALIASES does not match it "
                        "(data.columns), e.g. slide=Image patient=MRN 'label=Final Dx'")
    p.add_argument("--tissue", nargs="+", default=[], metavar="KEY=VALUE",
                   help="halo.data.TissueOptions fields (data.tissue), e.g. floor=0.05 enabled=false")
    p.add_argument("--max-mesh", type=int, default=64, metavar="N",
                   help="largest n x n mesh tried for the smallest one that fits (default 64)")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table (--image)")
    p.add_argument("--measure", action="store_true",
                   help="with --image: also run one training step of halo's real layers at the planned size on "
                        "fake tensors (nothing allocated) as one rank of a fake process group, in a fresh process, "
                        "and print planned and measured saved bytes, FLOPs and halo bytes; exit 1 if saved bytes "
                        "(or this rank's halo bytes) differ by more than 1 %% or FLOPs by more than 3 %%")
    p.add_argument("--measure-rank", nargs=2, type=int, default=None, metavar=("ROW", "COL"),
                   help="the rank --measure plays (default: the busiest, an interior one on meshes of 3 x 3 and up)")
    p.add_argument("--measure-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="give up on --measure after this long (default 1800)")
    t = p.add_argument_group("--time", "seconds per step, per epoch and for a cohort; every assumption is "
                                       "printed. With --slide / --csv: each slide's step, and the epoch over "
                                       "those slides (the sum of their step times; no --cohort)")
    t.add_argument("--time", action="store_true",
                   help="estimate step time: compute (FLOPs over peak x achieved fraction), halo messages, batch-norm "
                        "/ pooling / head collectives and DDP's gradient all-reduce, counted from the model")
    t.add_argument("--gpu", choices=sorted(GPUS), default=None,
                   help=f"accelerator preset: dense peak FLOP/s, memory and links from the vendor's spec sheet "
                        f"(default {DEFAULT_GPU})")
    t.add_argument("--math", choices=("bf16", "fp16", "tf32", "fp32"), default=None,
                   help="which peak applies (default: bf16 for --dtype bfloat16, tf32 for float32, cuDNN's default)")
    t.add_argument("--peak-flops", type=float, default=None, metavar="FLOP/S",
                   help="peak FLOP/s per GPU, instead of the preset's (e.g. 9.895e14)")
    t.add_argument("--achieved-fraction", type=float, default=None, metavar="F",
                   help=f"fraction of peak a training step achieves (default {DEFAULT_ACHIEVED_FRACTION}: an "
                        f"assumption, not measured; benchmarks/bench_gpu.py measures it on a GPU)")
    t.add_argument("--achieved-fraction-measured", action="store_true",
                   help="say that --achieved-fraction was measured (e.g. by benchmarks/bench_gpu.py)")
    t.add_argument("--link-gbps", nargs="+", type=float, default=None, metavar="GBIT/S",
                   help="bandwidth per GPU and direction in gigabits per second: within a node (NVLink) and "
                        "across nodes (InfiniBand); one value for both (default: the preset's)")
    t.add_argument("--latency-us", nargs="+", type=float, default=None, metavar="US",
                   help=f"latency per message or ring step in microseconds, within a node and across nodes "
                        f"(default {DEFAULT_LATENCY_US[0]:g} {DEFAULT_LATENCY_US[1]:g}: assumed)")
    t.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    t.add_argument("--data", type=int, default=1, metavar="D",
                   help="image groups trained side by side (data parallel; world = D x ROWS x COLS; default 1)")
    t.add_argument("--accumulate", type=int, default=1, help="train.accumulate: steps per gradient all-reduce")
    t.add_argument("--overlap", action="store_true",
                   help="assume communication fully overlaps compute (a lower bound; default: no overlap, an "
                        "upper bound)")
    t.add_argument("--cohort", type=int, default=None, metavar="N",
                   help="slides per epoch, with --image (--slide / --csv: the slides given)")
    t.add_argument("--epochs", type=int, default=1, help="epochs for the total (default 1)")
    p.add_argument("--json", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``halo-plan``'s arguments, each flag of :data:`TRAIN_DEFAULTS` not given taken from
    :func:`train_defaults` (``--mpp`` and ``--level`` only with ``--slide`` / ``--csv``: with
    ``--image`` the pixels are given). ``defaulted`` lists the flags so filled."""
    a = (parser or _parser()).parse_args(argv)
    d = train_defaults()
    a.defaulted = []
    for name in TRAIN_DEFAULTS:
        if getattr(a, name) is _UNSET:
            value = d[name] if a.image is None or name not in ("mpp", "level") else None
            setattr(a, name, value)
            if a.image is None or name not in ("mpp", "level"):
                a.defaulted.append(name)
    a.defaults_source = d["source"]
    return a


def _time_assumptions(a: argparse.Namespace) -> TimeAssumptions:
    """``--time``'s assumptions from the command line (the preset's figures where not given)."""
    gpu = GPUS[a.gpu or DEFAULT_GPU]
    math = a.math or math_mode(a.dtype)
    links = a.link_gbps or [gpu.intra_gbps, gpu.inter_gbps]
    latency = a.latency_us or list(DEFAULT_LATENCY_US)
    return TimeAssumptions(
        gpu=a.gpu or f"{DEFAULT_GPU} (default)", gpu_name=gpu.name, math=math,
        peak_flops=a.peak_flops if a.peak_flops is not None else gpu.peak[math],
        peak_source="--peak-flops" if a.peak_flops is not None else gpu.source,
        achieved_fraction=a.achieved_fraction if a.achieved_fraction is not None else DEFAULT_ACHIEVED_FRACTION,
        achieved_fraction_measured=a.achieved_fraction_measured and a.achieved_fraction is not None,
        intra_gbps=links[0], inter_gbps=links[-1], latency_us=(latency[0], latency[-1]),
        gpus_per_node=a.gpus_per_node, data=a.data, accumulate=a.accumulate, overlap=a.overlap)


def _time_plan(a: argparse.Namespace, p: Plan, model: nn.Module, traced: Trace, cohort: int | None = None) -> dict:
    """:func:`estimate_time` of one plan under the command line's assumptions."""
    syncs = step_syncs(p, model, stride=traced.stride, data=a.data)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return estimate_time(p, syncs, _time_assumptions(a), buffer_bytes=buffers, cohort=cohort, epochs=a.epochs)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``halo-plan`` command line."""
    from halo.models import build_classifier

    p = _parser()
    a = parse_args(argv, p)
    gpu = GPUS[a.gpu or DEFAULT_GPU]
    if a.gpu_memory is None:
        a.gpu_memory = gpu.memory_gb if a.gpu is not None else 80.0
    timing = [a.math, a.peak_flops, a.achieved_fraction, a.link_gbps, a.latency_us, a.cohort]
    if not a.time and (any(v is not None for v in timing) or a.overlap or a.achieved_fraction_measured
                       or (a.data, a.accumulate, a.epochs, a.gpus_per_node) != (1, 1, 1, 8)):
        p.error("--math, --peak-flops, --achieved-fraction[-measured], --link-gbps, --latency-us, --gpus-per-node, "
                "--data, --accumulate, --overlap, --cohort and --epochs apply with --time")
    if a.time:
        if a.image is None and a.cohort is not None:
            p.error("--cohort applies to --image: with --slide / --csv the epoch is over the slides given")
        for flag, values in (("--link-gbps", a.link_gbps), ("--latency-us", a.latency_us)):
            if values is not None and not 1 <= len(values) <= 2:
                p.error(f"{flag} takes one or two values (within a node, across nodes)")
        if a.achieved_fraction is not None and not 0 < a.achieved_fraction <= 1:
            p.error("--achieved-fraction must be in (0, 1]")
        if (a.peak_flops is not None and a.peak_flops <= 0) or any(v <= 0 for v in a.link_gbps or []) \
                or any(v < 0 for v in a.latency_us or []):
            p.error("--peak-flops and --link-gbps must be positive, --latency-us not negative")
        if min(a.gpus_per_node, a.data, a.accumulate, a.epochs) < 1 or (a.cohort is not None and a.cohort < 1):
            p.error("--gpus-per-node, --data, --accumulate, --epochs and --cohort must be positive")
    if min(a.mesh) < 1 or a.batch < 1 or a.num_classes < 1 or a.max_mesh < 1:
        p.error("--mesh, --batch, --num-classes and --max-mesh must be positive")
    if a.image is not None and (a.level is not None or a.root is not None or a.tissue):
        p.error("--level, --root and --tissue apply to --slide and --csv, not --image")
    if a.csv is None and a.columns:
        p.error("--columns applies to --csv (the headers of your CSV)")
    try:
        _columns(a.columns)
    except ValueError as e:
        p.error(str(e))
    if a.image is None and (a.measure or a.measure_rank is not None):
        p.error("--measure and --measure-rank apply to --image")
    if a.measure_rank is not None and not (0 <= a.measure_rank[0] < a.mesh[0] and 0 <= a.measure_rank[1] < a.mesh[1]):
        p.error(f"--measure-rank {a.measure_rank[0]} {a.measure_rank[1]} is not on the {a.mesh[0]} x {a.mesh[1]} mesh")
    try:
        model = build_classifier(a.model, a.num_classes, head=a.head)
        traced = trace_model(model)
    except (ValueError, HaloNotSupportedError) as e:
        print(f"halo-plan: --model {a.model}{_default_note(a, 'model')} --head {a.head}: {e}", file=sys.stderr)
        return 2
    if a.image is None:
        return _plan_slides(a, p, model, traced)
    if min(a.image) < 1:
        p.error("--image HEIGHT WIDTH must be positive")
    result = plan_model(model, name=a.model, image=tuple(a.image), mesh=tuple(a.mesh), dtype=a.dtype, batch=a.batch,
                        checkpointing=a.checkpointing, gpu_memory=a.gpu_memory * GB, mpp=a.mpp, traced=traced)
    measured = checks = None
    if a.measure:
        rank = tuple(a.measure_rank) if a.measure_rank is not None else result.busiest_rank
        try:
            [measured] = measure(a.model, tuple(a.image), tuple(a.mesh), ranks=[rank], head=a.head,
                                 num_classes=a.num_classes, dtype=a.dtype, batch=a.batch,
                                 checkpointing=a.checkpointing, timeout=a.measure_timeout)
        except RuntimeError as e:
            print(f"halo-plan --measure: {e}", file=sys.stderr)
            return 1
        checks = measure_checks(result, measured)
    status = 0
    if checks is not None and not all(c["ok"] for c in checks):
        bad = ", ".join(f"{c['name']} by {100 * c['relative']:+.2f} % (limit {100 * c['limit']:g} %)"
                        for c in checks if not c["ok"])
        print(f"halo-plan --measure: the plan differs from what rank {measured.rank} measured: {bad}", file=sys.stderr)
        status = 1
    timed = _time_plan(a, result, model, traced, cohort=a.cohort) if a.time else None
    if a.json:
        out = result.summary()
        if timed is not None:
            out["time"] = timed
        if a.layers:
            out["layers"] = [asdict(l) for l in result.layers]
        if measured is not None:
            out["measured"] = {**asdict(measured), "global_rank": measured.rank[0] * a.mesh[1] + measured.rank[1],
                               "dtype": _dtype_note(a.dtype), "checks": checks, "ok": status == 0}
        print(json.dumps(out, indent=2))
        return status
    s = result.summary()
    print(f"{a.model}{_default_note(a, 'model')} with a {a.head} head on {s['image'][0]} x {s['image'][1]} (H x W; padded {s['padded_image'][0]} x "
          f"{s['padded_image'][1]}), mesh {a.mesh[0]} x {a.mesh[1]}{_default_note(a, 'mesh')}, block {s['block'][0]} x "
          f"{s['block'][1]}, "
          f"batch {a.batch}, {a.dtype}"
          + (f", {s['field_mm'][0]} x {s['field_mm'][1]} mm at {a.mpp} mpp" if a.mpp else ""))
    for key in ("activation_bytes_per_rank", "param_bytes", "grad_bytes", "optimizer_bytes", "workspace_bytes",
                "total_bytes_per_rank", "halo_bytes_per_step_per_rank"):
        print(f"  {key:30s} {_fmt(s[key])}")
    print(f"  {'flops_per_rank':30s} {s['flops_per_rank'] / 1e12:.2f} TFLOP per step")
    print(f"  {'fits':30s} {s['fits']} ({a.gpu_memory:g} GB per GPU)")
    if len(result.ranks) > 1 or result.ranks[0].kind != "single":
        print("  per kind of rank (its busiest rank; halo_bytes_per_step_per_rank above is the mean over ranks):")
        for k in result.ranks:
            print(f"    {k.kind:9s} {k.count:4d} ranks  rank {k.rank[0]},{k.rank[1]}  halo {_fmt(k.halo_bytes_per_step):>9s} "
                  f"per step  peak {_fmt(k.total_bytes)}  {'fits' if k.fits else 'does not fit'}")
    if a.layers:
        for l in result.layers:
            print(f"  {l.name:28s} {l.type:18s} {str(l.out_shape):26s} saved {_fmt(l.saved_bytes):>10s} "
                  f"halo {_fmt(l.halo_bytes):>10s}")
    if timed is not None:
        _print_time(timed)
    if measured is not None:
        r, c = measured.rank
        print(f"measured: rank {r * a.mesh[1] + c} (row {r}, col {c}, {measured.kind}) of the {a.mesh[0]} x {a.mesh[1]} "
              f"mesh, one training step{' with checkpointing' if a.checkpointing else ''} of halo's layers on fake "
              f"tensors and a fake process group, {measured.seconds:.1f} s, {_fmt(measured.max_rss_bytes)} peak RSS; "
              f"{_dtype_note(a.dtype)}")
        print(f"  {'':30s} {'planned':>20s} {'measured':>20s} {'difference':>11s}")
        for ch in checks:
            unit = (lambda v: f"{v / 1e12:.4f} TFLOP") if ch["name"] == "flops_per_rank" else (lambda v: f"{v:,} B")
            name = ch["name"] + (" (this rank)" if ch["name"] == "halo_bytes_per_step" else "")
            print(f"  {name:30s} {unit(ch['planned']):>20s} {unit(ch['measured']):>20s} {100 * ch['relative']:+10.3f} % "
                  f" limit {100 * ch['limit']:g} %  {'ok' if ch['ok'] else 'DIFFERS'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
