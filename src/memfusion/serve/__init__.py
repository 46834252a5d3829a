"""``memfusion serve``: the memory store and the engine as an HTTP service (FastAPI + uvicorn).

    from memfusion.serve import KeyRing, Limits, ServeConfig, create_app, serve
    config = ServeConfig("sqlite:///mem.db", KeyRing.load("keys.json"), Limits(rate_per_s=20))
    serve(config)                                   # or: uvicorn with create_app(config)

Modules: :mod:`~memfusion.serve.app` (routes, errors, metrics), :mod:`~memfusion.serve.auth`
(API keys), :mod:`~memfusion.serve.limits` (size, rate, time), :mod:`~memfusion.serve.schemas`
(request / response bodies), :mod:`~memfusion.serve.run` (uvicorn, graceful shutdown).
Importing this package starts nothing and loads no model.
"""

from __future__ import annotations

from memfusion.serve.app import ServeConfig, create_app
from memfusion.serve.auth import ApiKey, KeyRing, Right, hash_key, new_key
from memfusion.serve.limits import Limits
from memfusion.serve.run import RunConfig, serve

__all__ = [
    "ApiKey",
    "KeyRing",
    "Limits",
    "Right",
    "RunConfig",
    "ServeConfig",
    "create_app",
    "hash_key",
    "new_key",
    "serve",
]
