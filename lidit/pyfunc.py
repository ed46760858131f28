"""A registered version as an MLflow pyfunc model: a thin `PythonModel` over `LiDiTPipeline`.

    import io, mlflow, pandas as pd
    from PIL import Image
    model = mlflow.pyfunc.load_model("models:/lidit-starter@production")
    pngs = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [7]}), params={"num_inference_steps": 20})
    Image.open(io.BytesIO(pngs[0]))

Schema (also in the model's signature, `SIGNATURE`):
- input: a DataFrame (or a dict of columns), one image per row: `prompt` (string, required), `seed` (integer,
  optional: the row's index when absent), `negative_prompt` (string, optional; empty = none).
- params: `num_inference_steps` (20), `guidance_scale` (4.0), `height` / `width` (0 = the export's
  `default_size`).
- output: a list of PNG bytes, one per input row, in row order. An image depends on its row only (prompt,
  seed, settings), not on its batch-mates.

Layout of the model directory (what training logs as the run's `pipeline` artifact and registers):

    MLmodel, python_env.yaml, requirements.txt, ...   MLflow's files
    pyfunc_model.py                                   models-from-code entry (no pickled object, no weights)
    artifacts/pipeline/                               the pipeline directory: pipeline.json + generator/

Encoders and the VAE are not copied in: they resolve under the loading machine's models root
(`lidit.locations`), with their fingerprints checked. The `lidit` package must be importable where the model
loads (it holds the generator and the sampling loop).
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

PIPELINE_KEY = "pipeline"
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
# What the model imports at load; pinned to this environment's versions (no slow requirement inference).
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "pillow", "numpy", "pandas", "pydantic")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "seed", required=False),
            ColSpec("string", "negative_prompt", required=False),
        ]
    ),
    outputs=Schema([ColSpec("binary")]),
    params=ParamSchema(
        [
            ParamSpec("num_inference_steps", "long", 20),
            ParamSpec("guidance_scale", "double", 4.0),
            ParamSpec("height", "long", 0),
            ParamSpec("width", "long", 0),
        ]
    ),
)


class LiDiTPyfunc(mlflow.pyfunc.PythonModel):
    """Prompts in, PNG bytes out (see the module doc for the schema)."""

    def load_context(self, context: Any) -> None:
        from lidit.pipeline import LiDiTPipeline, read_spec

        directory = context.artifacts[PIPELINE_KEY]
        self.default_size = read_spec(directory).default_size
        self.pipe = LiDiTPipeline.from_pretrained(directory)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[bytes]:
        import torch

        from lidit.images import png_bytes

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame.columns:
            raise ValueError(f"input needs a 'prompt' column (got {list(frame.columns)})")
        if frame.empty:
            return []
        p = {s.name: s.default for s in SIGNATURE.params.params} | (params or {})
        height = int(p["height"]) or self.default_size
        width = int(p["width"]) or self.default_size
        prompts = [str(x) for x in frame["prompt"]]
        seeds = self._column(frame, "seed", list(range(len(prompts))))
        negatives = [str(n) if n else "" for n in self._column(frame, "negative_prompt", [""] * len(prompts))]
        guidance = float(p["guidance_scale"])
        texts = self.pipe.encode(prompts)
        negative = has_negative = None
        if guidance != 1.0 and any(negatives):
            negative = self.pipe.encode(negatives)
            has_negative = torch.tensor([bool(n) for n in negatives])
        images = self.pipe.generate_from_features(
            texts,
            [int(s) for s in seeds],
            height,
            width,
            int(p["num_inference_steps"]),
            guidance,
            negative,
            has_negative,
        )
        return [png_bytes(im) for im in images]

    @staticmethod
    def _column(frame: Any, name: str, default: list) -> list:
        """`frame[name]` with missing cells (NaN/None) taken from `default`."""
        if name not in frame.columns:
            return default
        return [d if v is None or v != v else v for v, d in zip(frame[name].tolist(), default, strict=True)]


def save_pyfunc(pipeline_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model directory for the pipeline at `pipeline_dir` to `path` (copies the pipeline
    into `artifacts/pipeline`); returns `path`."""
    path, pipeline_dir = Path(path), Path(pipeline_dir)
    if path.exists():
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory(prefix="lidit-pyfunc-") as tmp:
        if pipeline_dir.name != PIPELINE_KEY:  # MLflow names the copy after the source folder
            pipeline_dir = Path(shutil.copytree(pipeline_dir, Path(tmp) / PIPELINE_KEY))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(CODE_FILE),
            artifacts={PIPELINE_KEY: str(pipeline_dir)},
            signature=SIGNATURE,
            pip_requirements=[f"{name}=={metadata.version(name)}" for name in REQUIREMENTS],
        )
    return path
