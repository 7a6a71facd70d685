"""The serve stage: an OpenAI-compatible Ray Serve application over the fused models (app.py), a
static-cache decoder and engine that serve them fast (decoder.py, weights.py, engine.py), per-tenant
API keys (keys.py) and the benchmark client (bench.py)."""
