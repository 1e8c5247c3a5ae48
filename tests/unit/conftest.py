"""Session fixtures shared by the unit tests: prepared models and their source weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.models.gguf_weights import LlamaWeights, load_llama_weights
from router.models.prepare import minilm_source_dir, prepare_models, smollm2_gguf_path


@pytest.fixture(scope="session")
def prepared_models(model_cache: Path) -> dict[str, Path]:
    """{name: folder} for 'smollm2-135m-instruct' (int4), its '-fp32' twin and 'all-minilm-l6-v2'.

    Built once into the router's model cache (the one `make run` uses; $IROUTER_MODEL_CACHE
    overrides it), so later runs reuse it.
    """
    return prepare_models(model_cache, progress=False, decoder_precisions=("int4", "fp32"))


@pytest.fixture(scope="session")
def llama_weights() -> LlamaWeights:
    """SmolLM2's GGUF weights dequantized to float32 (the reference models' input)."""
    return load_llama_weights(smollm2_gguf_path())


@pytest.fixture(scope="session")
def bert_tensors() -> dict[str, np.ndarray]:
    from router.models.encoder_onnx import load_bert_tensors

    return load_bert_tensors(minilm_source_dir())
