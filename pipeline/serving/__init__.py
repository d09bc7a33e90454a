"""Serving a trained model: an OpenAI-compatible HTTP API with continuous batching and a chat page.

scheduler.py runs one model's generation loop (the engine's DecodeBatch), protocol.py holds the
OpenAI request shapes and their checks, api.py the FastAPI app, metrics.py the Prometheus figures,
static/ the chat page. `python -m pipeline stage=serve` (pipeline/stages/serve.py) puts them together.
"""
