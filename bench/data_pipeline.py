"""The data pipeline at corpus scale: prepare throughput, cache size, launch time and memory against corpus size.

On a synthetic corpus generated here (documents of OpenWebText-like length, words drawn from the embedded corpus's
word frequencies, ``.jsonl`` files), with the quickstart's data config (a BPE-2048 trained on the corpus):

1. prepare: what ``cdlm prepare`` does, with ``--workers`` tokenising processes: tokens/s (tokenizer training timed
   apart) and the cache's bytes per token;
2. launch: ``python train.py`` on the prepared cache (a fresh process, tiny model, float32): seconds from launch to
   the first training step, and the process's peak resident memory (its ``VmHWM``); ``--launches``
   repetitions, median;
3. the same on a small (``--small-tokens``) and a large (``--tokens``) corpus: peak memory must not grow with the
   corpus (each process maps its cache; nothing is held per token).

    python bench/data_pipeline.py [--tokens 220e6] [--small-tokens 10e6] [--workers 2] [--work /tmp/cdlm-data-bench]
        [--out bench/results/data_pipeline_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS_PER_FILE = 20_000
MEAN_WORDS = 700  # OpenWebText's documents average roughly a thousand GPT-2 tokens


def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """Words of the embedded corpus's training split and their frequencies (a Zipf-like law)."""
    from cdlm.data.corpus import load_corpus

    counts = Counter(re.findall(r"\S+", " ".join(load_corpus("train"))))
    words, freq = zip(*counts.most_common())
    p = np.array(freq, dtype=np.float64)
    return np.array(words, dtype=object), p / p.sum()


def tokens_per_word(tokenizer, words: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> float:
    """Tokens per word of the tokenizer on a sample of the synthetic text."""
    sample = " ".join(rng.choice(words, size=200_000, p=p))
    return len(tokenizer.encode(sample)) / 200_000


def generate(folder: Path, target_tokens: float, tokenizer, seed: int = 0) -> dict:
    """Write ``.jsonl`` files of synthetic documents holding about ``target_tokens`` tokens (kept if present)."""
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words, p = vocabulary()
    target_words = int(target_tokens / tokens_per_word(tokenizer, words, p, rng))
    written, n_docs, files = 0, 0, 0
    started = time.perf_counter()
    while written < target_words:
        docs = min(DOCS_PER_FILE, -(-(target_words - written) // MEAN_WORDS))
        lengths = np.maximum(20, rng.lognormal(np.log(MEAN_WORDS) - 0.5, 1.0, size=docs)).astype(int)
        flat = rng.choice(len(words), size=int(lengths.sum()), p=p)
        cuts = np.cumsum(lengths)[:-1]
        with open(folder / f"part-{files:05d}.jsonl", "w", encoding="utf-8") as out:
            for doc in np.split(flat, cuts):
                out.write(json.dumps({"text": " ".join(words[doc])}) + "\n")
        written, n_docs, files = written + int(lengths.sum()), n_docs + docs, files + 1
    info = {"words": written, "documents": n_docs, "files": files, "seconds": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(info))
    return info


def data_args(folder: Path, cache: Path, workers: int) -> list[str]:
    """The data settings of both the prepare step and the training launch (one config, one cache)."""
    return [
        "experiment=quickstart",
        f"data.source={folder}",
        f"data.cache_dir={cache}",
        f"data.prepare_workers={workers}",
    ]


def prepare(folder: Path, cache: Path, workers: int) -> dict:
    """What ``cdlm prepare`` does, from scratch and timed: the BPE-2048 trained on the corpus, then the token cache."""
    import shutil

    from cdlm.config import compose, instantiate

    shutil.rmtree(cache, ignore_errors=True)
    datamodule = instantiate(compose(data_args(folder, cache, workers)).data)
    started = time.perf_counter()
    datamodule.prepare_tokenizer()
    trained = time.perf_counter()
    path = datamodule.token_cache()
    seconds = time.perf_counter() - trained
    manifest = json.loads((path / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    size = sum(f.stat().st_size for f in path.iterdir() if f.name != "manifest.json")
    return {
        "cache": str(path),
        "tokens": tokens,
        "documents": sum(s["documents"] for s in manifest["splits"].values()),
        "tokenizer_training_s": round(trained - started, 2),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "bytes_per_token": round(size / tokens, 4),
        "dtype": manifest["dtype"],
        "workers": workers,
    }


LAUNCH = textwrap.dedent(
    """
    import sys, time
    import lightning as L
    from cdlm import training
    from cdlm.cli import main

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                print(f"FIRST_STEP {time.time()}", flush=True)

    build = training.build_trainer
    def build_trainer(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(FirstStep())
        return trainer

    training.build_trainer = build_trainer
    try:
        main(["train", *sys.argv[1:]])
    finally:  # VmHWM: this process image's peak (ru_maxrss would also count the forked parent's memory before exec)
        status = open("/proc/self/status").read()
        print("PEAK_RSS", next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM")), flush=True)
    """
)


def launch(folder: Path, cache: Path, work: Path, steps: int, workers: int, launches: int) -> dict:
    """Fresh ``cdlm train`` processes on the prepared cache: seconds to the first step, peak memory (medians)."""
    driver = work / "launch.py"
    driver.write_text(LAUNCH)
    args = [
        *data_args(folder, cache, workers), "model=tiny", "trainer.precision=32-true", "data.max_val_tokens=4096",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=0",
        "sample.n=1", "sample.length=16", "sampler.steps=2", f"run_dir={work / 'run'}", "overwrite=true",
    ]  # fmt: skip
    seconds, peaks = [], []
    for _ in range(launches):
        started = time.time()
        proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()  # reads the pipe while the child runs, so it cannot block on a full pipe
        if proc.returncode != 0:
            raise RuntimeError(f"the training process failed (status {proc.returncode}):\n{out[-2000:]}")
        first = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("FIRST_STEP"))
        seconds.append(round(first - started, 2))
        peaks.append(round(peak_rss_mb(out), 1))
    return {
        "launch_to_first_step_s": round(statistics.median(seconds), 2),
        "peak_rss_mb": round(statistics.median(peaks), 1),
        "launches": {"launch_to_first_step_s": seconds, "peak_rss_mb": peaks},
    }


def peak_rss_mb(output: str) -> float:
    """The training process's own peak resident memory, which it prints at exit (``PEAK_RSS``)."""
    return next(float(line.split()[1]) for line in output.splitlines() if line.startswith("PEAK_RSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens",
        type=float,
        default=220e6,
        help="target size (the corpus's own BPE needs fewer tokens "
        "per word than the estimate, so 220e6 gives a little over 200M)",
    )
    parser.add_argument("--small-tokens", type=float, default=10e6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each launch")
    parser.add_argument("--launches", type=int, default=3, help="training launches per corpus (medians reported)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cdlm-data-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/data_pipeline_cpu.json")
    opts = parser.parse_args()

    from cdlm.config import compose, instantiate

    tokenizer = instantiate(compose(["experiment=quickstart"]).data).prepare_tokenizer()  # sizes the corpus
    load_before = os.getloadavg()
    result = {"corpora": {}}
    for name, target in (("small", opts.small_tokens), ("large", opts.tokens)):
        folder = opts.work / f"corpus-{name}"
        corpus = generate(folder, target, tokenizer, seed=1 if name == "small" else 2)
        prepared = prepare(folder, opts.work / f"cache-{name}", opts.workers)
        launched = launch(folder, opts.work / f"cache-{name}", opts.work, opts.steps, opts.workers, opts.launches)
        result["corpora"][name] = {"target_tokens": target, "generated": corpus, "prepare": prepared, **launched}
        print(f"{name}: {json.dumps(result['corpora'][name])}", flush=True)
    small, large = result["corpora"]["small"], result["corpora"]["large"]
    result["peak_rss_difference_mb"] = round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
    result["conditions"] = {
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "tokenizer": "bpe-2048 trained on each corpus (tokenizer_training_s, not in prepare's tokens/s)",
        "note": "prepare: reading the .jsonl files in the parent + tokenising processes (spawned); launch: python "
        "train.py (experiment=quickstart, model=tiny, float32) on the prepared cache: seconds from Popen to the "
        "first training step, peak RSS (VmHWM of /proc/self/status, read at its exit) of that process",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"prepare {large['prepare']['tokens_per_s']:,} tokens/s ({opts.workers} processes), "
        f"{large['prepare']['bytes_per_token']} bytes/token; first step {large['launch_to_first_step_s']} s after "
        f"launch; peak RSS {small['peak_rss_mb']} MB (small) vs {large['peak_rss_mb']} MB (large); wrote {opts.out}"
    )


if __name__ == "__main__":
    main()
