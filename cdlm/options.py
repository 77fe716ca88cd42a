"""The options of ``cdlm sample``, ``cdlm eval`` and ``cdlm schedule``: typed, range-checked, with their help.

Each command reads ``key=value`` options (values read as YAML reads them: ``4`` is an int, ``null`` is None) plus
``sampler=NAME`` and ``sampler.KEY=value``. An option's type and range are checked before any model is loaded.
``cdlm.api`` takes the same options as keyword arguments (``checked``) and config overrides as a list or a mapping
(``as_arguments``); ``sample_length`` is the one rule for a sample's length.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cdlm.config import SAMPLE_LENGTH, SAMPLE_N, ConfigError, _parse_value, build_settings

DEFAULT_EVAL_N = 16
"""Samples per seed that ``cdlm eval`` (and ``cdlm.api.evaluate``) draw by default."""
DEFAULT_PROMPT_TOKENS = 64
"""Prompt tokens of the conditional protocol (``cdlm eval prompts=val``)."""
DEFAULT_SEEDS = 3
"""Seeds that ``cdlm eval`` (and ``cdlm.api.evaluate``) draw samples with by default."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help line."""
    return field(default=default, metadata={"help": help})


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` where this machine has a CUDA device, else ``cpu``; any other value as it is."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(device: str) -> None:
    """A torch device string this machine has: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or ``mps``)."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={device!r} is not a device; valid: auto, cpu, cuda, cuda:N") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: this machine has no CUDA device; use device=cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is not supported; valid: auto, cpu, cuda, cuda:N, mps")


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


AUTO_LENGTH = "auto"  # cdlm sample length=auto: up to max_length (the run's data.seq_len), each ending at its EOS


@dataclass(frozen=True)
class SampleOptions:
    """``cdlm sample`` / ``python sample.py``: draw samples from a trained model."""

    path: str | None = option(None, "a save_pretrained folder (RUN_DIR/final) or a .ckpt file (required)")
    n: int = option(SAMPLE_N, "number of samples")
    length: int | str | None = option(
        None, "tokens per sample (default: the run's data.seq_len); auto: up to max_length, each ending at its EOS"
    )
    max_length: int | None = option(None, "with length=auto: the longest a sample may be (default: data.seq_len)")
    seed: int = option(0, "random seed of the draws")
    batch_size: int | None = option(None, "samples per sampler call (default: all n at once)")
    out: str | None = option(None, "write the samples as JSONL to this file")
    trace: str | None = option(None, "write an HTML trace of the denoising steps to this file")
    overwrite: bool = option(False, "replace an existing out / trace file")
    device: str = option("auto", "auto (cuda where there is one, else cpu), cpu, cuda or cuda:N")
    devices: int = option(1, "shard the samples over this many processes")
    prompt: str | None = option(None, "text every sample starts with, kept exactly")
    prompt_file: str | None = option(None, "prompts, one per line (or JSONL with a prompt field): n samples for each")
    suffix: str | None = option(None, "text every sample ends with, kept exactly (with or without prompt=)")
    infill: str | None = option(None, "infilling template: kept text with [MASK:k] spans of k tokens to generate")
    stop_at_eos: bool = option(True, "end each sample at its first generated EOS (padding after it)")
    rope_scale: float = option(1.0, "NTK-aware rotary scaling to sample this many times the trained length (>= 1)")

    def __post_init__(self) -> None:
        require_path(self.path)
        if isinstance(self.length, str) and self.length != AUTO_LENGTH:
            raise ConfigError(f"length={self.length!r} is not a length; give a positive integer or auto")
        if not self.rope_scale >= 1:
            raise ConfigError(f"rope_scale must be >= 1 (1 = as trained), got {self.rope_scale}")
        if self.length == AUTO_LENGTH and not self.stop_at_eos:
            raise ConfigError("length=auto ends each sample at its EOS: it needs stop_at_eos=true")
        if self.max_length is not None and self.length != AUTO_LENGTH:
            raise ConfigError("max_length= bounds length=auto; for a fixed length give length=N alone")
        for name in ("n", "length", "max_length", "batch_size", "devices"):
            positive(name, None if getattr(self, name) == AUTO_LENGTH else getattr(self, name))
        check_device(self.device)
        for name in ("out", "trace"):
            check_new_file(name, getattr(self, name), self.overwrite)
        if self.prompt is not None and self.prompt_file is not None:
            raise ConfigError("give prompt= or prompt_file=, not both")
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise ConfigError(f"prompt_file={self.prompt_file!r}: no such file; give a text or JSONL file of prompts")
        conditioned = [
            name for name in ("prompt", "prompt_file", "suffix", "infill") if getattr(self, name) is not None
        ]
        if self.infill is not None and len(conditioned) > 1:
            raise ConfigError(
                f"infill= takes no {' / '.join(c + '=' for c in conditioned if c != 'infill')}: "
                "write the prompt and suffix into the template"
            )
        if self.infill is not None:
            from cdlm.prompts import parse_template

            try:
                parse_template(self.infill)
            except ValueError as err:
                raise ConfigError(f"infill: {err}") from err
        if self.devices > 1 and conditioned:
            raise ConfigError(f"conditioned samples are drawn in one process: use devices=1 with {conditioned[0]}=")

    def conditioning(self) -> dict:
        """``generate``'s ``prompt`` (one text per sample), ``suffix`` and ``template`` (one per sample) keywords."""
        prompts = self.prompts()
        n = self.n if prompts is None else len(prompts)
        template = None if self.infill is None else [self.infill] * n
        return {"prompt": prompts, "suffix": self.suffix, "template": template}

    def prompts(self) -> list[str] | None:
        """One prompt per sample (``n`` for each prompt of ``prompt_file``), or None without prompts."""
        if self.prompt is not None:
            return [self.prompt] * self.n
        if self.prompt_file is None:
            return None
        texts = read_prompts(Path(self.prompt_file))
        return [text for text in texts for _ in range(self.n)]


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: one per non-empty line, or, for a line that is a JSON object, its ``"prompt"``
    string (JSONL). A ``ConfigError`` names the first line that is neither."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"prompt_file={str(path)!r} line {number}: not JSON ({err.msg})") from err
            if not isinstance(row.get("prompt"), str):
                raise ConfigError(f'prompt_file={str(path)!r} line {number}: a JSON line needs a "prompt" string')
            texts.append(row["prompt"])
        else:
            texts.append(line)
    if not texts:
        raise ConfigError(f"prompt_file={str(path)!r} holds no prompt")
    return texts


@dataclass(frozen=True)
class EvalOptions:
    """``cdlm eval``: the validation bound, Gen PPL and entropy over seeds, and the reference row, as one JSON."""

    path: str | None = option(None, "a save_pretrained folder or a .ckpt file (required)")
    judge: str | None = option(None, "an AR run (folder or .ckpt) or a transformers causal LM name / local path")
    n: int = option(DEFAULT_EVAL_N, "samples per seed")
    length: int | None = option(None, "tokens per sample (default: the run's data.seq_len)")
    seeds: int = option(DEFAULT_SEEDS, "number of seeds")
    val_batches: int | None = option(None, "validation batches for the bound (default: the whole split; 0: none)")
    reference: bool = option(True, "also score real validation text (the reference row)")
    zero_shot: list[str] | None = option(
        None,
        "corpora for the zero-shot bound: [a.txt,dir/,hf:NAME[:CONFIG],wikitext2,wikitext103,ptb,lambada,ag_news,"
        "pubmed,arxiv] (named ones download the first time)",
    )
    zero_shot_tokens: int | None = option(None, "tokens scored per zero-shot corpus (default: all)")
    out: str | None = option(None, "the result JSON (default: eval_<sampler>_<steps>.json beside the model)")
    batch_size: int | None = option(None, "samples per sampler call (default: all n at once)")
    device: str = option("auto", "auto (cuda where there is one, else cpu), cpu, cuda or cuda:N; the judge runs there")
    prompts: str | None = option(None, "val: continue prompts from validation windows, judged given their prompt")
    prompt_tokens: int = option(DEFAULT_PROMPT_TOKENS, "tokens of each prompt (prompts=val)")
    mauve: bool = option(False, "MAUVE of the continuations against the true ones (prompts=val, judge; mauve-text)")
    infill_span: int | None = option(None, "fill the middle K tokens of validation windows: infilling accuracy")

    def __post_init__(self) -> None:
        require_path(self.path)
        for name in ("n", "length", "seeds", "zero_shot_tokens", "batch_size", "prompt_tokens", "infill_span"):
            positive(name, getattr(self, name))
        if self.prompts is not None and self.prompts != "val":
            raise ConfigError(f"prompts={self.prompts!r} is not a prompt source; valid: val")
        if self.prompts is not None and self.length is not None and self.prompt_tokens >= self.length:
            raise ConfigError(
                f"prompt_tokens={self.prompt_tokens} leaves nothing to generate in length={self.length}; "
                "give prompt_tokens < length"
            )
        if self.prompts is not None and self.infill_span is not None:
            raise ConfigError("infill_span and prompts=val are two protocols: give one of them")
        if self.val_batches is not None and self.val_batches < 0:
            raise ConfigError(f"val_batches must be >= 0 (0 skips the bound), got {self.val_batches}")
        check_device(self.device)


@dataclass(frozen=True)
class ScheduleOptions:
    """``cdlm schedule``: plot a bitstream model's learned entropy-rate noise schedule."""

    path: str | None = option(None, "a save_pretrained folder or a .ckpt file (required)")
    out: str | None = option(None, "the PNG file (default: schedule.png beside the model)")

    def __post_init__(self) -> None:
        require_path(self.path)


def sample_length(config: Mapping[str, Any], length: int | str | None, max_length: int | None = None) -> int:
    """Tokens per sample for a run's stored ``config``: ``length``, by default the run's ``data.seq_len``, within the
    positions the model covers (``model.max_len``); the one rule of ``cdlm sample``, ``cdlm eval`` and the API.
    ``auto`` (``cdlm sample``): the canvas is ``max_length`` (default: the run's ``data.seq_len``), the longest a
    sample may be, and each sample ends at its first generated EOS (``stop_at_eos``)."""
    if length == AUTO_LENGTH:
        length = max_length
    length = length or int(config["data"].get("seq_len", SAMPLE_LENGTH))
    max_len = config["model"].get("max_len")
    if max_len is not None and length > max_len:
        raise ConfigError(f"length={length} exceeds the model's max_len={max_len} positions; use length <= {max_len}")
    return length


def require_path(path: str | None) -> None:
    if path is None:
        raise ConfigError("path= is required: a save_pretrained folder (RUN_DIR/final) or a .ckpt file")
    if not Path(path).exists():
        raise ConfigError(f"path={path!r}: no checkpoint at {path}; give a save_pretrained folder or a .ckpt file")


def check_new_file(name: str, path: str | None, overwrite: bool) -> None:
    """An output file that may be written: not a folder, and not an existing file unless ``overwrite``."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ConfigError(f"{name}={path!r} is a folder; give a file name")
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"{name}={path!r} exists; choose another file or pass overwrite=true to replace it")


VERBATIM = frozenset({"prompt", "suffix", "infill"})
"""Options whose value is text taken as typed: ``infill=[MASK:4] of France`` is not a YAML list, ``prompt=1599``
not a number."""


def parse_options(argv: list[str], cls: type, command: str) -> tuple[Any, str | None, dict]:
    """``(options, sampler name or None, sampler.KEY overrides)`` of a command's ``key=value`` arguments (the
    ``VERBATIM`` ones as typed, the others parsed like YAML values)."""
    given, chosen, sampler = {}, None, {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{command}: argument {arg!r} is not of the form key=value; see cdlm {command} --help")
        key, raw = arg.split("=", 1)
        value = raw if key in VERBATIM else _parse_value(key, raw)
        if key == "sampler":
            chosen = str(value)
        elif key.startswith("sampler."):
            sampler[key.removeprefix("sampler.")] = value
        else:
            given[key] = value
    valid = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(given) - set(valid)):
        raise ConfigError(f"unknown {command} option(s) {unknown}; valid: {valid}, sampler=NAME, sampler.KEY=value")
    return build_settings(cls, "", given), chosen, sampler


def checked(cls: type, **given: Any) -> Any:
    """``cls(**given)`` for an options class, each value's type and range checked as on the command line
    (``ConfigError``, a ``ValueError``): the typed API's way to take the options of ``cdlm sample`` / ``eval``."""
    return build_settings(cls, "", given)


def override_value(value: Any) -> str:
    """A value as a command-line ``key=value`` value (``true``/``false``, ``null``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(override_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def as_arguments(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Config overrides as ``key=value`` arguments: a list of them as it is, a mapping ``{key: value}`` formatted."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings or a mapping, got the string {overrides!r}")
    if isinstance(overrides, Mapping):
        return [f"{key}={override_value(value)}" for key, value in overrides.items()]
    if not all(isinstance(arg, str) for arg in overrides):
        raise ConfigError(f"overrides must be key=value strings, got {list(overrides)!r}")
    return list(overrides)


def describe_options(cls: type) -> str:
    """One line per option: ``name=default  help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = OmegaConf.to_yaml({"v": f.default}).strip()[3:] if f.default is not None else "null"
        lines.append(f"  {f.name + '=' + default:<24} {f.metadata.get('help', '')}")
    return "\n".join(lines)
