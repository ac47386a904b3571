"""Reading and vetting a PEFT ``adapter_config.json`` for LoRA.

Only what keeps the math ``y = W x + scaling * B A x`` is accepted; every field that would change it
is refused with a message naming the field. Per-module rank, alpha and targeting follow peft 0.21.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import regex

from lorafleet_adapters.errors import AdapterFormatError, AdapterIncompatible
from lorafleet_adapters.manifest import is_finite_number
from lorafleet_adapters.strict_json import unique_keys

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
ALL_LINEAR = "all-linear"
# One match of a config's pattern against a module name (~50 characters) takes microseconds; this is
# the most it may take before the adapter is refused (a pattern that backtracks catastrophically).
REGEX_MATCH_SECONDS = 0.05
# ... and all of one config's matches, in CPU seconds of the loading thread (an EVA config of 80 layers,
# 560 rank_pattern and 560 alpha_pattern keys, one per module: 0.65 s)
REGEX_CONFIG_SECONDS = 5.0

# Fields that change the forward pass (or need a different base) and are refused unless default-like.
_REFUSED = {
    "use_dora": "DoRA adds a magnitude vector",
    "modules_to_save": "it replaces whole base modules",
    "lora_bias": "it adds a bias to lora_B",
    "target_parameters": "it targets raw parameters instead of Linear modules",
    "layer_replication": "it changes the layer stack of the base model",
    "alora_invocation_tokens": "activated LoRA applies the adapter to selected tokens only",
    "trainable_token_indices": "it changes token embeddings",
    "use_qalora": "QA-LoRA pools the input features",
    "arrow_config": "Arrow routes between adapters at inference",
    "kasa_config": "KaSA changes the base weights and adds singular values",
    "monteclora_config": "MonteCLoRA samples adapter weights",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "megatron_config": "Megatron parallel layers are not supported",
}
# Fields with no effect on inference given the checks above; any value is accepted.
_HARMLESS = frozenset(
    {
        "peft_type",
        "peft_version",
        "auto_mapping",
        "revision",
        "task_type",
        "inference_mode",
        "lora_dropout",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "velora_config",
        "ensure_weight_tying",
        "init_lora_weights",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "fan_in_fan_out",
        "base_model_name_or_path",
        "bias",
    }
)
# init_lora_weights values that leave the base weights untouched (pissa, olora, corda, loftq, lora_ga
# rewrite the base; mica is a LoRA variant with its own forward).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass(frozen=True)
class LoraConfigInfo:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    layers_to_transform: tuple[int, ...] | None
    fan_in_fan_out: bool
    base_model_name_or_path: str | None
    target_modules_regex: str | None = None  # target_modules given as one regex (or "all-linear")
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # harmless fields kept for reference
    # Runs the patterns above against module names, within one time budget for this config.
    matcher: PatternMatcher = field(default_factory=lambda: PatternMatcher(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_pattern", MappingProxyType(dict(self.rank_pattern)))
        object.__setattr__(self, "alpha_pattern", MappingProxyType(dict(self.alpha_pattern)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def rank_for(self, module: str) -> int:
        """The rank of `module` (full name, e.g. ``model.layers.0.self_attn.q_proj``), as peft computes it."""
        value = self.matcher.once(
            ("rank", module), lambda: _pattern_value(self.matcher, self.rank_pattern, module, self.r)
        )
        return int(value)

    def alpha_for(self, module: str) -> float:
        value = self.matcher.once(
            ("alpha", module), lambda: _pattern_value(self.matcher, self.alpha_pattern, module, self.lora_alpha)
        )
        return float(value)

    def scaling_for(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for this module's own rank and alpha."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether peft would wrap `module` with this config (mirrors ``check_target_module_exists``)."""
        if self._excluded(module):
            return False
        if self.target_modules_regex is not None:
            if self.target_modules_regex.lower() == ALL_LINEAR:
                return True
            return self.matcher.match(self.target_modules_regex, module, "target_modules", full=True) is not None
        found = module in self.target_modules or any(module.endswith(f".{t}") for t in self.target_modules)
        if not found or self.layers_to_transform is None:
            return found
        index = _layer_index(self.matcher, module, self.layers_pattern)
        return index is not None and index in self.layers_to_transform

    def _excluded(self, module: str) -> bool:
        if not self.exclude_modules:
            return False
        if isinstance(self.exclude_modules, str):
            return self.matcher.match(self.exclude_modules, module, "exclude_modules", full=True) is not None
        return module in self.exclude_modules or any(module.endswith(f".{e}") for e in self.exclude_modules)


def read_lora_config(adapter_dir: Path, max_lora_rank: int) -> LoraConfigInfo:
    """Read ``adapter_config.json`` of `adapter_dir`, refusing anything that changes the LoRA math."""
    raw = _load_json(adapter_dir / CONFIG_FILE)
    if raw.get("peft_type") != "LORA":
        raise AdapterFormatError(
            f"{CONFIG_FILE}: field 'peft_type' is {raw.get('peft_type')!r}; only 'LORA' is supported"
        )
    _refuse_math_changes(raw)
    r = _int_field(raw, "r")
    rank_pattern = _pattern_field(raw, "rank_pattern", _int_value)
    alpha_pattern = _pattern_field(raw, "alpha_pattern", _float_value)
    _check_ranks(r, rank_pattern, max_lora_rank)
    target_list, target_regex = _targets_field(raw)
    extra = {k: v for k, v in raw.items() if k in _HARMLESS and k not in LoraConfigInfo.__dataclass_fields__}
    return LoraConfigInfo(
        r=r,
        lora_alpha=_float_value("lora_alpha", raw.get("lora_alpha", 8)),
        use_rslora=_bool_field(raw, "use_rslora"),
        target_modules=target_list,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=_layers_field(raw),
        fan_in_fan_out=_bool_field(raw, "fan_in_fan_out"),
        base_model_name_or_path=_optional_str(raw, "base_model_name_or_path"),
        target_modules_regex=target_regex,
        layers_pattern=_str_list_field(raw, "layers_pattern"),
        exclude_modules=_exclude_field(raw),
        extra=extra,
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterFormatError(f"{path.name} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
        text = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFormatError(f"{path.name} is missing from {path.parent}") from None
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path.name} must hold a JSON object")
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite constant {name}")


def _default_like(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str | list | dict) and len(value) == 0)


def _refuse_math_changes(raw: Mapping[str, Any]) -> None:
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterFormatError(f"{CONFIG_FILE}: field 'bias' is {bias!r}; only 'none' is supported")
    for key, why in _REFUSED.items():
        if not _default_like(raw.get(key)):
            raise AdapterFormatError(f"{CONFIG_FILE}: field {key!r}={raw[key]!r} is not supported ({why})")
    init = raw.get("init_lora_weights", True)
    if not any(init is safe or (isinstance(init, str) and init == safe) for safe in _SAFE_INITS):
        raise AdapterFormatError(
            f"{CONFIG_FILE}: field 'init_lora_weights'={init!r} is not supported: that initialisation "
            "changes the base weights; convert the adapter to plain LoRA first"
        )
    for key, value in raw.items():
        if key not in _HARMLESS and key not in _REFUSED and not _default_like(value):
            raise AdapterFormatError(f"{CONFIG_FILE}: unsupported field {key!r}={value!r}")


def _int_value(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be an integer, got {value!r}")
    return value


def _float_value(name: str, value: Any) -> float:
    if not is_finite_number(value):
        raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _int_field(raw: Mapping[str, Any], name: str) -> int:
    if name not in raw:
        raise AdapterFormatError(f"{CONFIG_FILE}: required field {name!r} is missing")
    return _int_value(name, raw[name])


def _bool_field(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be true or false, got {value!r}")
    return value


def _optional_str(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be a string or null, got {value!r}")
    return value


class PatternMatcher:
    """``re.match`` / ``re.fullmatch`` of a config's patterns, as peft runs them, within limits. The
    patterns are a publisher's regexes run in the server: one match may take REGEX_MATCH_SECONDS and
    all of one config's matches REGEX_CONFIG_SECONDS (many keys each just under the first limit
    would otherwise add up to hours), else the adapter is refused (AdapterFormatError) instead of
    holding a load thread; the ``regex`` engine releases the GIL while it matches (``concurrent``),
    so serving goes on. Each pattern is compiled once (an EVA config has a key per module, past the
    engines' compile caches), and what Python's re (peft's engine) refuses is refused too."""

    def __init__(self) -> None:
        self._compiled: dict[str, regex.Pattern[str]] = {}
        self._spent = 0.0  # CPU seconds of this config's matching so far (its threads' own, not the machine's)
        self._answers: dict[tuple[str, str], Any] = {}

    def once(self, key: tuple[str, str], compute: Callable[[], Any]) -> Any:
        """``compute()``'s answer for ``key`` (a field and a module), computed once per config: a load
        asks each module's rank and alpha more than once, and an EVA config's keys are as many as its
        modules (a pass is quadratic)."""
        if key not in self._answers:
            self._answers[key] = compute()
        return self._answers[key]

    def match(self, pattern: str, module: str, field: str, *, full: bool = False) -> regex.Match[str] | None:
        compiled = self._compiled.get(pattern)
        try:
            if compiled is None:
                re.compile(pattern)  # peft's engine: what it refuses (a flag mid-pattern) is refused too
                compiled = self._compiled[pattern] = regex.compile(pattern)
            left = REGEX_CONFIG_SECONDS - self._spent
            if left <= 0:
                raise TimeoutError
            started = time.thread_time()
            try:
                run = compiled.fullmatch if full else compiled.match
                return run(module, timeout=min(REGEX_MATCH_SECONDS, left), concurrent=True)
            finally:
                self._spent += time.thread_time() - started
        except TimeoutError:
            raise AdapterFormatError(
                f"{CONFIG_FILE}: field {field!r}: pattern {pattern[:120]!r} took too long to match {module!r} "
                f"(limits: {REGEX_MATCH_SECONDS * 1e3:.0f} ms a match, {REGEX_CONFIG_SECONDS:g} CPU s for the config)"
            ) from None
        except (re.error, regex.error, RecursionError) as exc:  # RecursionError: nested past the parser's stack
            raise AdapterFormatError(
                f"{CONFIG_FILE}: field {field!r}: invalid pattern {pattern[:120]!r}: {exc!s:.200}"
            ) from None


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError) as exc:  # RecursionError: groups nested past the parser's stack
        raise AdapterFormatError(
            f"{CONFIG_FILE}: field {name!r} has an invalid pattern {pattern[:120]!r}: {exc!s:.200}"
        ) from None


def _pattern_field(raw: Mapping[str, Any], name: str, convert: Any) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be an object, got {value!r}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        _check_regex(name, key)
        out[key] = convert(f"{name}[{key!r}]", item)
    return out


def _check_ranks(r: int, rank_pattern: Mapping[str, int], max_lora_rank: int) -> None:
    for label, rank in [("r", r), *((f"rank_pattern[{k!r}]", v) for k, v in rank_pattern.items())]:
        if rank < 1:
            raise AdapterFormatError(f"{CONFIG_FILE}: field {label} is {rank}; a rank must be >= 1")
        if rank > max_lora_rank:
            raise AdapterIncompatible(
                f"{CONFIG_FILE}: field {label} is {rank}, over this server's max_lora_rank {max_lora_rank}"
            )


def _str_list_field(raw: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = raw.get(name)
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterFormatError(f"{CONFIG_FILE}: field {name!r} must be a string or a list of strings, got {value!r}")


def _targets_field(raw: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    value = raw.get("target_modules")
    if isinstance(value, str) and value:
        _check_regex("target_modules", value)
        return (value,), value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(set(value))), None
    raise AdapterFormatError(
        f"{CONFIG_FILE}: field 'target_modules' must be a non-empty list of module names or a regex, got {value!r}"
    )


def _exclude_field(raw: Mapping[str, Any]) -> tuple[str, ...] | str | None:
    value = raw.get("exclude_modules")
    if isinstance(value, str) and value:
        _check_regex("exclude_modules", value)
        return value
    return _str_list_field(raw, "exclude_modules")


def _layers_field(raw: Mapping[str, Any]) -> tuple[int, ...] | None:
    value = raw.get("layers_to_transform")
    if value is None or value == []:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise AdapterFormatError(
            f"{CONFIG_FILE}: field 'layers_to_transform' must be an integer or a list of integers, got {value!r}"
        )
    return tuple(items)


def _pattern_value(matcher: PatternMatcher, patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` followed by ``patterns.get(key, default)``."""
    for key in patterns:
        if matcher.match(rf"(.*\.)?({key})$", module, "rank_pattern / alpha_pattern"):
            return patterns[key]
    return patterns.get(module, default)


def _layer_index(matcher: PatternMatcher, module: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in layers_pattern:
            match = matcher.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module, "layers_pattern")
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))
