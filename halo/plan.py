"""halo-plan: activation memory, halo traffic and FLOPs per rank, before buying GPUs.

The model is run once on a tiny image (64 x 64 by default, no gradients) with forward
hooks on its leaf modules, which records every layer's tensors and window geometry.
Everything else is arithmetic: each traced shape ``(1, C, a, b)`` becomes
``(N, C, a h / 64, b w / 64)`` for a local block of ``h x w``, so a 100,000 x 100,000
slide is never allocated.

Saved bytes follow what autograd really keeps (checked against
``torch.autograd.graph.saved_tensors_hooks`` in the tests): a convolution saves its input
block and, in halo, the thin halo strips; max pooling int64 indices (in halo also those of
its border bands; plain torch also keeps the input); batch norm saves its input; ReLU its
output; average pooling the halo-extended input; global pooling nothing. A tensor saved by
two layers (a ReLU's output feeding a convolution) is counted once, and
parameters and buffers are not activations. Functional ops inside a model's ``forward``
(residual additions) save nothing and are not seen. Parameters, gradients and the two
AdamW states are float32 (autocast keeps master weights in float32); activations use
``--dtype``.

Halo bytes are the two-phase volume: rows first (``top + bottom`` rows of the block
width), then columns of the row-extended block, sent once forward and once backward (the
adjoint), except for a first layer whose input needs no gradient. Per-rank figures are
means over the ranks of the mesh: ranks at the image edges send less.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from halo.exchange import HaloSpec
from halo.geometry import padded_size
from halo.nn._window import border_bands, native_padding, pair, split_local, window_spec

__all__ = ["LayerPlan", "Plan", "plan", "plan_model", "measure_saved_bytes", "measure_checkpointed_bytes",
           "build_model", "main"]

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
        Bytes sent per training step (forward and backward), mean over ranks.
    flops:
        Forward FLOPs on this rank (2 per multiply-add).
    """

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    halo: tuple[int, int, int, int] | None
    saved_bytes: int
    halo_bytes: int
    flops: int


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

    def summary(self) -> dict:
        """Everything but the per-layer table, as JSON-ready values."""
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        if self.mpp is not None:
            out["field_mm"] = [round(s * self.mpp / 1000, 3) for s in self.image]
        return out


@dataclass(slots=True)
class _Traced:
    name: str
    module: nn.Module
    ins: tuple[int, tuple[int, ...]]  # (storage key, shape) of the first input
    out: tuple[int, tuple[int, ...]]
    segment: str | None


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
    """Leaf path -> checkpoint segment (the stage holding it, as :func:`_stages` cuts them)."""
    stage_of = {id(m): f"stage{i}" for i, stage in enumerate(_stages(model)) for m in stage.modules()}
    return {name: stage_of[id(m)] for name, m in model.named_modules() if id(m) in stage_of}


def trace(model: nn.Module, size: int = TRACE_SIZE, channels: int = 3) -> list[_Traced]:
    """Leaf layers in call order with their input/output storages and shapes at ``size`` x ``size``."""
    records: list[_Traced] = []
    keep: list[torch.Tensor] = []  # hold every tensor so no storage address is reused
    seg = _segments(model)
    hooks = []
    for name, mod in model.named_modules():
        if len(mod._modules) == 0:
            def hook(m, args, out, name=name):
                x = args[0]
                keep.extend([x, out])
                records.append(_Traced(name, m, (_key(x), tuple(x.shape)), (_key(out), tuple(out.shape)), seg.get(name)))
            hooks.append(mod.register_forward_hook(hook))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, size, size))
    finally:
        model.train(was)
        [h.remove() for h in hooks]
    return records


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


_WINDOW_OR_NORM = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d)
_SAVES_OUTPUT = (nn.ReLU, nn.Sigmoid, nn.Tanh)
_SAVES_NOTHING = (nn.Flatten, nn.Identity, nn.AdaptiveAvgPool2d, nn.Dropout2d, nn.Dropout)


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
    trace_size: int = TRACE_SIZE,
) -> Plan:
    """Plan one training step of ``model`` on an ``image`` sharded over a ``mesh``.

    Parameters
    ----------
    halo_layers:
        Model halo's layers (strips, extended pooling inputs); ``False`` plans plain torch
        on one process (``mesh`` must then be ``(1, 1)``).
    input_requires_grad:
        Whether the image needs a gradient (then the first layer's halo travels back too).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    rows, cols = mesh
    grid = _Grid(rows, cols)
    if rows < 1 or cols < 1 or batch < 1 or min(image) < 1:
        raise ValueError(f"mesh, batch and image sizes must be positive, got mesh={mesh}, batch={batch}, image={image}")
    if not halo_layers and (rows, cols) != (1, 1):  # plain torch has no mesh
        raise ValueError(f"halo_layers=False plans one process; mesh must be (1, 1), got {mesh}")
    records = trace(model, trace_size)
    total_stride = max(trace_size // r.out[1][-1] for r in records if isinstance(r.module, _WINDOW_OR_NORM))
    ph, pw = padded_size(image[0], rows * total_stride), padded_size(image[1], cols * total_stride)
    h, w = ph // rows, pw // cols
    eb = DTYPE_BYTES[dtype]

    def scale(shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 4:
            return (batch, *shape[1:])
        return (batch, shape[1], shape[2] * h // trace_size, shape[3] * w // trace_size)

    layers: list[LayerPlan] = []
    seen: set[int] = set()
    seg_seen: set[int] = set()
    seg_peak: dict[str, int] = {}
    outside = 0
    first_window = True
    for r in records:
        m, ins, outs = r.module, scale(r.ins[1]), scale(r.out[1])
        spec = _halo(m, r.name) if halo_layers else None
        local_pad = (0, 0)
        if spec is not None and isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            spec, local_pad = split_local(spec, grid)  # unsharded dims use the op's own padding
        elif spec is not None and rows * cols == 1:  # average pooling on one rank is plain torch
            spec = None
        if spec is not None and spec.is_empty:
            spec = None
        fresh = 0  # bytes of tensors only this layer saves
        keyed: list[tuple[int, int]] = []  # (storage key, bytes) shared with other layers
        nin, nout = _numel(ins), _numel(outs)
        if isinstance(m, nn.MaxPool2d):  # int64 indices; plain torch also keeps the input
            fresh += nout * 8
            if spec is not None:  # by bands, also those of the border bands' outputs
                fresh += _band_outputs(m, spec, local_pad, ins, outs) * 8
            if not halo_layers:
                keyed.append((r.ins[0], nin * eb))
        elif isinstance(m, nn.Conv2d):  # the block (shared) and the thin strips
            keyed.append((r.ins[0], nin * eb))
            if spec is not None:
                n, c, bh, bw = ins
                eh = bh + spec.top + spec.bottom
                fresh += n * c * eb * ((spec.top + max(spec.bottom, 0)) * bw + (spec.left + max(spec.right, 0)) * eh)
        elif isinstance(m, nn.BatchNorm2d):
            keyed.append((r.ins[0], nin * eb))
            fresh += 2 * ins[1] * eb
        elif isinstance(m, nn.AvgPool2d):  # sharded: nothing but the divisors that exclude padding
            if halo_layers and rows * cols > 1:
                if not m.count_include_pad and m.divisor_override is None and spec is not None:
                    fresh += outs[2] * outs[3] * eb
            else:
                keyed.append((r.ins[0], nin * eb))
        elif isinstance(m, _SAVES_OUTPUT):
            keyed.append((r.out[0], nout * eb))
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            keyed.append((r.ins[0], nin * eb))
            fresh += nout * 8
        elif not isinstance(m, _SAVES_NOTHING):
            keyed.append((r.ins[0], nin * eb))
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
        halo_bytes = 0
        if spec is not None:
            n, c, bh, bw = ins
            eh = bh + spec.top + spec.bottom
            rows_sent = (rows - 1) / rows * (spec.top + max(spec.bottom, 0)) * bw
            cols_sent = (cols - 1) / cols * (spec.left + max(spec.right, 0)) * eh
            directions = 1 if first_window and not input_requires_grad else 2
            halo_bytes = round(directions * n * c * eb * (rows_sent + cols_sent))
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            first_window = False
        layers.append(LayerPlan(
            name=r.name, type=type(m).__name__, in_shape=ins, out_shape=outs,
            halo=None if spec is None else (spec.top, spec.bottom, spec.left, spec.right),
            saved_bytes=saved, halo_bytes=halo_bytes, flops=_flops(m, ins, outs),
        ))
    activation = outside + max(seg_peak.values(), default=0) if checkpointing else sum(l.saved_bytes for l in layers)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * 4
    largest = max((_numel(l.out_shape) for l in layers), default=0) * eb
    workspace = 2 * largest + 2**30  # a layer's output and input gradient in flight, CUDA context
    total = activation + 4 * param_bytes + workspace
    fwd = sum(l.flops for l in layers)
    return Plan(
        model=name, image=tuple(image), padded_image=(ph, pw), mesh=(rows, cols), block=(h, w), dtype=dtype,
        batch=batch, checkpointing=checkpointing, activation_bytes_per_rank=int(activation), param_count=params,
        param_bytes=param_bytes, grad_bytes=param_bytes, optimizer_bytes=2 * param_bytes, workspace_bytes=workspace,
        total_bytes_per_rank=int(total), halo_bytes_per_step_per_rank=sum(l.halo_bytes for l in layers),
        forward_flops_per_rank=fwd, flops_per_rank=3 * fwd + (fwd if checkpointing else 0),
        gpu_memory_bytes=int(gpu_memory), fits=total <= gpu_memory, mpp=mpp, layers=tuple(layers),
    )


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
    skip = {_key(t) for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor):
        k = _key(t)
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
        inside.pop(_key(x), None)
        largest = max(largest, sum(inside.values()))
        with torch.no_grad():
            x = stage(x)
    return outside + largest


_UNITS = ("B", "KB", "MB", "GB", "TB")


def _fmt(n: float) -> str:
    i = next(i for i in range(len(_UNITS)) if abs(n) < 1000 ** (i + 1) or i == len(_UNITS) - 1)
    return f"{n / 1000**i:.1f} {_UNITS[i]}"


def main(argv: Sequence[str] | None = None) -> None:
    """The ``halo-plan`` command line."""
    p = argparse.ArgumentParser(prog="halo-plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="torchvision model name, e.g. resnet50")
    p.add_argument("--image", nargs=2, type=int, required=True, metavar=("H", "W"), help="global image size in pixels")
    p.add_argument("--mesh", nargs=2, type=int, default=(1, 1), metavar=("R", "C"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each trunk stage in backward, as train.checkpointing does")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80, an H100)")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel, to report the field of view")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = plan(a.model, tuple(a.image), tuple(a.mesh), dtype=a.dtype, batch=a.batch,
                  checkpointing=a.checkpointing, gpu_memory=a.gpu_memory * GB, mpp=a.mpp)
    if a.json:
        out = result.summary()
        if a.layers:
            out["layers"] = [asdict(l) for l in result.layers]
        return print(json.dumps(out, indent=2))
    s = result.summary()
    print(f"{a.model} on {s['image'][0]} x {s['image'][1]} (padded {s['padded_image'][0]} x {s['padded_image'][1]}), "
          f"mesh {a.mesh[0]} x {a.mesh[1]}, block {s['block'][0]} x {s['block'][1]}, batch {a.batch}, {a.dtype}"
          + (f", {s['field_mm'][0]} x {s['field_mm'][1]} mm at {a.mpp} mpp" if a.mpp else ""))
    for key in ("activation_bytes_per_rank", "param_bytes", "grad_bytes", "optimizer_bytes", "workspace_bytes",
                "total_bytes_per_rank", "halo_bytes_per_step_per_rank"):
        print(f"  {key:30s} {_fmt(s[key])}")
    print(f"  {'flops_per_rank':30s} {s['flops_per_rank'] / 1e12:.2f} TFLOP per step")
    print(f"  {'fits':30s} {s['fits']} ({a.gpu_memory:g} GB per GPU)")
    if a.layers:
        for l in result.layers:
            print(f"  {l.name:28s} {l.type:18s} {str(l.out_shape):26s} saved {_fmt(l.saved_bytes):>10s} "
                  f"halo {_fmt(l.halo_bytes):>10s}")


if __name__ == "__main__":
    main()
