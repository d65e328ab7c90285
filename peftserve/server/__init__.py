"""The services behind the routes, and the assemblies of ``peftserve serve``.

The api layer (``peftserve.api``) holds FastAPI routes only; what they call lives here:

- ``adapters``: ``AdapterService``, the one path by which adapters are uploaded, registered,
  served and deleted (registry + stable pointers + model table + engine agree);
- ``model_table``: which API model name means which engine adapter, through the canary router;
- ``canary``: ``CanaryRuntime``, the rollout controller wired into the request path (request
  accounting, probes, shadow copies) and its Prometheus collector;
- ``metrics``: per-version request metrics and the engine collector;
- ``errors``: ``APIError`` and the errors services raise, in OpenAI's shape;
- ``settings``: ``ServeSettings``, every config field as a flag and a ``PEFTSERVE_*`` variable;
- ``startup``: opening the engine, registry and rollout store, with one-line start-up errors;
- ``local``: the single-process composition (``peftserve serve``).
"""
