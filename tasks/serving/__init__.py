"""`v2m serve`: the champion (or any REF) over HTTP.

    app.py      create_app(): the FastAPI app; routers for the API, the operations endpoints and the page
    holder.py   ModelHolder: the model being served; follows a registry alias and swaps atomically
    batcher.py  Batcher: a bounded queue and one worker that runs requests arriving together as one batch
    inputs.py   upload and form checks: each bad input is a RequestError with its 4xx status; a vocal is judged
                by its header before it is decoded
    guard.py    the edge (shared with `v2m listen`): Host, cross-origin POST, API keys, the body counted as it
                arrives against a byte limit and a deadline, a deadline on headers, per-client slots
    access.py   at start: API keys from the environment, no open port beyond loopback, serve's MLflow credentials
    metrics.py  Prometheus metrics (a registry per app)
    server.py   serve(): build everything from params.yaml `serve:` and run uvicorn

FastAPI on uvicorn: both come with MLflow and Prefect already (no new heavy dependency), FastAPI parses
multipart uploads and lets another module add routers (`/listen`), and uvicorn is the ASGI server MLflow's own
`mlflow models serve` runs on. A serving library (BentoML, Ray Serve, Triton) would bring its own model store
and process model, while the model store here is the MLflow registry and generation is a single
long-running call per request that needs batching across requests more than replica management.
"""
