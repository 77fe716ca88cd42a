"""``DiffusionLM.generate``'s prompt, template and suffix as one canvas of fixed positions, and the check that a
sampler can keep it (docs/sampling.md, "Prompts")."""

from __future__ import annotations

from collections.abc import Callable

from cdlm.prompts import Prompt, canvas_prompt, parse_template, prefix_prompt, suffix_pieces
from cdlm.samplers.registry import SamplerSpec
from cdlm.types import AbsorbingObjective, BlockwiseObjective


def keepable(objective: object, prompt: Prompt | None, n: int, length: int, spec: SamplerSpec) -> Prompt | None:
    """``prompt`` (of ``canvas``) checked: a ``ValueError`` if the sampler cannot keep it or it is not
    ``[n, length]``."""
    if prompt is None:
        return None
    blockwise = isinstance(objective, BlockwiseObjective) and objective.blockwise
    fits = spec.takes_fixed or isinstance(objective, AbsorbingObjective)
    shape = getattr(objective, "state_shape", None)
    per_token = shape is None or shape(n, length)[1] == length  # a latent state has L / r positions
    if not blockwise and not (fits and per_token):  # a block-causal prior takes a prefix as its first blocks
        hint = " (a latent prior takes a prefix with objective.prior_block set)" if not per_token else ""
        raise ValueError(f"sampler {spec.name!r} on {type(objective).__name__} cannot keep a prompt{hint}")
    if tuple(prompt.ids.shape) != (n, length):
        raise ValueError(f"the prompt is {tuple(prompt.ids.shape)}, the samples [{n}, {length}]")
    return prompt


def canvas(
    tokens: Callable[[str | list[int]], list[int]],
    prompt: Prompt | str | list[str] | list[list[int]] | None,
    template: str | list[str] | None,
    suffix: str | list[int] | None,
    n: int,
    length: int,
) -> Prompt | None:
    """``generate``'s prompt, template and suffix as one ``Prompt`` of ``[n, length]`` (texts through the run's
    tokenizer, without EOS), or None when none is given; a ``ValueError`` for a combination that does not fit."""
    if template is not None and (prompt is not None or suffix is not None):
        raise ValueError("give a template, or a prompt and / or a suffix, not both")
    if isinstance(prompt, Prompt):
        if suffix is not None:
            raise ValueError("a suffix goes with a text or token-id prompt, not a Prompt of fixed positions")
        return prompt
    if template is not None:
        texts = [template] if isinstance(template, str) else list(template)
        rows = [[tokens(p) if isinstance(p, str) else p for p in parse_template(t)] for t in texts]
        return canvas_prompt(rows, n, length)
    if prompt is None and suffix is None:
        return None
    if prompt is None:
        prompt = [[]]
    rows = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    prefixes = [tokens(r) for r in rows]
    if suffix is None:
        return prefix_prompt(prefixes, n, length)
    end = tokens(suffix)
    return canvas_prompt([suffix_pieces(prefix, end, length) for prefix in prefixes], n, length)
