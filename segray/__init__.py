"""segray: distributed semantic segmentation on Ray.

Submodules: ``segray.data`` (ingest and input pipeline), ``segray.models``,
``segray.metrics``, ``segray.train``, ``segray.inference``, ``segray.storage``.
They are imported on use, so ``import segray`` stays cheap (no TensorFlow).
"""

__version__ = "0.1.0"
