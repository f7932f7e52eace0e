"""halo: train CNNs on gigapixel images sharded spatially over many ranks, exactly.

::

    mesh = halo.SpatialMesh(rows=2, cols=2)
    model = halo.parallelize(torchvision.models.resnet50(num_classes=2), mesh)
    logits = model(halo.scatter(image, mesh))
"""

from halo.blockwise import predict_blockwise
from halo.errors import HaloNotSupportedError, HaloShapeError
from halo.exchange import HaloSpec, exchange_halo
from halo.mesh import SpatialMesh
from halo.parallelize import manual_seed, parallelize
from halo.tensor import gather, scatter

__all__ = [
    "SpatialMesh",
    "parallelize",
    "scatter",
    "gather",
    "manual_seed",
    "predict_blockwise",
    "exchange_halo",
    "HaloSpec",
    "HaloNotSupportedError",
    "HaloShapeError",
]
__version__ = "0.1.0"
