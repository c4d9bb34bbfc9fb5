"""A real-time path: the model of a run behind HTTP on Ray Serve (``segray serve``).

``requests`` reads bodies and writes answers (no Ray); ``app`` is the Serve
deployment and ``serve``, which starts it.
"""

from segray.serving.app import Served, serve

__all__ = ["Served", "serve"]
