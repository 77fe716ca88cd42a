"""The evaluation protocol's reference row: real validation text, windows of the packed validation stream."""

from __future__ import annotations

import torch

from cdlm.evaluate import reference_texts, run_datamodule


def test_reference_windows_are_evenly_spaced_runs_of_the_validation_stream(tiny_run):
    _, module = tiny_run
    texts, windows = reference_texts(module, n=3, length=8)
    stream = torch.from_numpy(
        run_datamodule(module, max_val_tokens=None).dataset("validation").tokens[:].astype("int64")
    )
    assert windows.shape == (3, 8) and len(texts) == 3
    starts = torch.linspace(0, stream.numel() - 8, 3).long()
    assert all(torch.equal(w, stream[s : s + 8]) for w, s in zip(windows, starts))
    assert texts == [module.tokenizer.decode(w.tolist()) for w in windows]
