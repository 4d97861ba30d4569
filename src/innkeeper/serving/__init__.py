"""The serving runtime: which models exist and are loaded, and what a request may cause.

Between the HTTP routes (api/) and the engine: the registry (catalog, residency, loading and
unloading, idle unload), one `Service` per loaded model, background jobs (pulls). No FastAPI
here: refusals are typed `ServingError`s that api/errors.py turns into each family's shape.
"""
