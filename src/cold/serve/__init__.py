"""The OpenAI-compatible HTTP server (`cold serve`): one app over a decoding backend.

    app.py             the FastAPI app: everything HTTP (auth, limits, model ids, shapes, usage, errors)
    protocol.py        the request bodies, their checks and their DecodeParams; ApiError
    backend.py         the Backend interface, Job / JobFailed, the decode-thread base class
    engine_backend.py  the backend over `cold.decoding.engine.Engine` (its thread: scheduler.py)
    scheduler.py       continuous batching: the thread that owns the engine
    vllm_backend.py    the backend over vLLM's async engine (online CoLD pairs, `cold.vllm.online`)
    metrics.py         the server's Prometheus metrics

Imports point one way: these modules use the core and `cold.vllm`, never `cold.cli`.
"""
