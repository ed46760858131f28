"""Ray Serve stage: TextEncoder -> Generator deployments behind an OpenAI-style images API (FastAPI ingress).

`serving.app:app_builder` builds the application; `python -m serving CONFIG.yaml` (or `lidit serve`) runs it.
"""
