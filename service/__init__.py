"""Ray Serve on top of flm/: tensor-parallel shards on Ray actors, a continuously batching decode engine, and
OpenAI-compatible routes (`flm serve`, and `service.app.deploy` for the REST gateway). `service.spec` (what a
deployment is) imports neither torch nor Ray: the gateway validates deployments with it.

`flm/` never imports this package; this package imports `flm/`, Ray and FastAPI, never `api/`.
"""
