"""SpatialMesh: the world cut into ``data x rows x cols`` ranks on a torch DeviceMesh.

Rank order is row-major within an image: global rank ``d * rows * cols + r * cols + c``
holds block ``(r, c)`` of image group ``d``. Mesh axes are named ``data``, ``row`` and
``col``; neighbours are found per axis through the axis' process group, never by
arithmetic on the global rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["SpatialMesh", "AXES"]

AXES = ("data", "row", "col")


class SpatialMesh:
    """The world as a ``(data, row, col)`` grid of ranks.

    Parameters
    ----------
    rows, cols:
        How many blocks each image is cut into along H and W.
    device_type:
        ``"cuda"`` or ``"cpu"``; by default the device type of the default process
        group's backend (``cuda`` for NCCL, ``cpu`` otherwise).

    Raises
    ------
    RuntimeError
        If torch.distributed is not initialised.
    ValueError
        If ``rows`` or ``cols`` is below 1 or ``rows * cols`` does not divide the world size.
    """

    def __init__(self, rows: int = 1, cols: int = 1, *, device_type: str | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "SpatialMesh needs torch.distributed to be initialised "
                "(dist.init_process_group, or launch through halo's launchers)"
            )
        for name, value in (("rows", rows), ("cols", cols)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mesh {name} must be a positive integer, got {value!r}")
        world = dist.get_world_size()
        if world % (rows * cols):
            raise ValueError(
                f"mesh rows x cols = {rows} x {cols} = {rows * cols} does not divide the world size "
                f"{world}; use a world size that is a multiple of {rows * cols}, or a mesh whose "
                f"rows x cols divides {world}"
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.rows = rows
        self.cols = cols
        self.data = world // (rows * cols)
        self.device_type = device_type
        self.device_mesh: DeviceMesh = init_device_mesh(
            device_type, (self.data, rows, cols), mesh_dim_names=AXES
        )
        rank = dist.get_rank()
        self.coords: tuple[int, int, int] = (
            rank // (rows * cols),
            (rank // cols) % rows,
            rank % cols,
        )
        per_image = [
            list(range(d * rows * cols, (d + 1) * rows * cols)) for d in range(self.data)
        ]
        if self.data == 1:
            self.spatial_group = dist.group.WORLD
        else:
            self.spatial_group, _ = dist.new_subgroups_by_enumeration(per_image)
        self.data_group = self.device_mesh.get_group("data")

    @property
    def size(self) -> int:
        """Ranks per image (``rows * cols``)."""
        return self.rows * self.cols

    @property
    def world_size(self) -> int:
        return self.data * self.rows * self.cols

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols

    def axis_group(self, axis: str) -> dist.ProcessGroup:
        """The process group along mesh axis ``"data"``, ``"row"`` or ``"col"``."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return self.device_mesh.get_group(axis)

    def axis_index(self, axis: str) -> int:
        """This rank's index along ``axis``."""
        return self.coords[AXES.index(axis)]

    def axis_size(self, axis: str) -> int:
        return (self.data, self.rows, self.cols)[AXES.index(axis)]

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def __repr__(self) -> str:
        return (
            f"SpatialMesh(data={self.data}, rows={self.rows}, cols={self.cols}, "
            f"coords={self.coords}, device_type={self.device_type!r})"
        )
