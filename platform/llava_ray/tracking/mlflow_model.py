"""The final model as a real MLflow model: loadable from the registry and servable by ``mlflow models serve``.

:func:`log_final_model` logs an exported Hugging Face folder (``final/hf``: a stock
``LlavaForConditionalGeneration`` with its processor and chat template) as an MLflow 3 LoggedModel
with two flavors:

- ``transformers`` (task ``image-text-to-text``), so
  ``mlflow.transformers.load_model(uri, return_type="components")`` gives back the
  ``LlavaForConditionalGeneration``, its processor and tokenizer (MLflow builds no pipeline for a
  model saved with a processor; ``transformers.pipeline("image-text-to-text", **components)`` does);
- ``python_function`` with this module as its loader, so ``mlflow.pyfunc.load_model(uri)`` and
  ``mlflow models serve -m uri`` answer prompts about images. MLflow's own transformers pyfunc does
  not support image-text-to-text pipelines; :class:`LlavaPyfunc` wraps the same pipeline.

pyfunc input: a DataFrame (or records) with a ``prompt`` column and an optional ``image`` column
(base64 image bytes, a local path or an http(s) URL); ``params`` may set ``max_new_tokens``
(default 64). Output: one generated answer per row.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASK = "image-text-to-text"
MAX_NEW_TOKENS = 64


def default_requirements() -> list[str]:
    """What the model needs to load and serve (``mlflow models serve`` installs these elsewhere)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("llava-ray", "transformers", "torch", "pillow", "mlflow"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def signature() -> Any:
    """Rows of ``prompt`` (+ optional ``image``) in, one answer each out; ``max_new_tokens`` a param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", MAX_NEW_TOKENS)]),
    )


def save_model(path: str, mlflow_model: Any = None, hf_dir: str | None = None, **kwargs: Any) -> None:
    """The flavor entry point ``mlflow.models.Model.log`` calls: the transformers flavor of ``hf_dir``
    saved at ``path``, plus a ``python_function`` flavor served by :func:`_load_pyfunc`."""
    import mlflow.pyfunc
    import mlflow.transformers
    import transformers
    from mlflow.models import Model

    if mlflow_model is None:
        mlflow_model = Model()
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    pipeline = transformers.pipeline(TASK, model=hf_dir, processor=processor)
    mlflow.transformers.save_model(
        pipeline,
        path,
        processor=processor,
        task=TASK,
        mlflow_model=mlflow_model,
        signature=signature(),
        pip_requirements=kwargs.pop("pip_requirements", None) or default_requirements(),
        **kwargs,
    )
    mlflow.pyfunc.add_to_model(
        mlflow_model, loader_module=__name__, conda_env="conda.yaml", python_env="python_env.yaml"
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_final_model(
    uri: str, run_id: str, hf_dir: Path, name: str = "model", registered_model_name: str | None = None
) -> Any:
    """Log ``hf_dir`` as the run's model (and register it); returns MLflow's ``ModelInfo``."""
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    import llava_ray.tracking.mlflow_model as flavor

    client = MlflowClient(uri)
    # Created here, in the run's experiment: Model.log alone would file it under the fluent API's
    # current experiment (the default one), away from its run.
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id, model_type="llava"
    )
    # Model.log talks to the fluent API's current store. Setting that (and setting it back) also sets
    # or removes $MLFLOW_TRACKING_URI, which later jobs in this process read: restore it as it was.
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            return Model.log(
                artifact_path=None,
                name=name,
                flavor=flavor,
                run_id=run_id,
                model_id=logged.model_id,
                registered_model_name=registered_model_name,
                hf_dir=str(hf_dir),
            )
    finally:
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


# -- serving -------------------------------------------------------------------------------------


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> LlavaPyfunc:
    import mlflow.transformers
    import transformers

    # A model saved with its processor loads as components (MLflow refuses to build the pipeline).
    components = mlflow.transformers.load_model(path, return_type="components")
    return LlavaPyfunc(
        transformers.pipeline(TASK, model=components["model"], processor=components["processor"])
    )


class LlavaPyfunc:
    """``predict`` over rows of ``prompt`` (+ ``image``) with the logged transformers pipeline."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import pandas as pd

        rows = (
            model_input.to_dict("records")
            if isinstance(model_input, pd.DataFrame)
            else [model_input]
            if isinstance(model_input, dict)
            else list(model_input)
        )
        max_new_tokens = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        answers = []
        for row in rows:
            row = {"prompt": row} if isinstance(row, str) else row
            content: list[dict[str, Any]] = []
            if row.get("image"):
                content.append({"type": "image", "image": load_image(str(row["image"]))})
            content.append({"type": "text", "text": str(row["prompt"])})
            output = self.pipeline(
                text=[{"role": "user", "content": content}],
                max_new_tokens=max_new_tokens,
                return_full_text=False,
            )
            answers.append(output[0]["generated_text"])
        return answers


def load_image(reference: str) -> Any:
    """A PIL image from base64 bytes, a local path or an http(s) URL."""
    from PIL import Image

    if reference.startswith(("http://", "https://")):
        with urllib.request.urlopen(reference, timeout=30) as response:
            data = response.read()
    elif os.path.exists(reference):
        data = Path(reference).read_bytes()
    else:
        data = base64.b64decode(reference)
    return Image.open(io.BytesIO(data)).convert("RGB")
