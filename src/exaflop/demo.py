"""The main job (`exaflop demo`, what `make demo` runs).

Language model: tokenize the Python standard library, train the `lm-tiny` preset,
compare its val loss with the unigram baseline, sample, plot. Driving: simulate
highway episodes, train `drive-tiny`, beat two baselines, render (when the
driving package and highway-env are installed).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from exaflop.errors import UserError
from exaflop.progress import console


def run_lm(out: Path, data_root: Path = Path("data"), steps: int = 0, corpus_bytes: int = 0) -> dict:
    from exaflop.config import load_config
    from exaflop.engine.trainer import train
    from exaflop.lm.baseline import unigram_cross_entropy
    from exaflop.lm.sample import sample_text
    from exaflop.lm.shards import build_text_dataset, read_manifest
    from exaflop.plot import plot_run

    t0 = time.perf_counter()
    # A partial corpus gets its own folder so it never stands in for the full one.
    data = data_root / (f"stdlib-{corpus_bytes}b" if corpus_bytes else "stdlib")
    if not (data / "manifest.json").is_file():
        console.rule("[bold]1. exaflop data text — the Python standard library as a corpus")
        build_text_dataset("stdlib", data, vocab_size=4096, max_bytes=corpus_bytes)
    m = read_manifest(data)
    console.print(f"corpus: {m['documents']['train']:,} train / {m['documents']['val']:,} val documents, "
                  f"{m['tokens']['train']:,} train tokens ({time.perf_counter() - t0:.0f}s)")
    console.rule("[bold]2. exaflop train lm-tiny")
    cfg = load_config("lm-tiny", [f"run.out_dir={out}", f"data.path={data}"]
                      + ([f"train.steps={steps}"] if steps else []))
    result = train(cfg)
    base = unigram_cross_entropy(data)
    run_dir = Path(result["run_dir"])
    png = plot_run(run_dir)
    text = sample_text(run_dir, "def ", max_new_tokens=120, temperature=0.7, top_k=40, seed=0)
    console.rule("[bold]language model")
    console.print(f"val loss  {result['val_loss']:.3f} nats/token ({result['val_bpb']:.3f} bits/byte)")
    console.print(f"unigram   {base['unigram_val_loss']:.3f} nats/token ({base['unigram_val_bpb']:.3f} bits/byte)"
                  f"  <- the model is {base['unigram_val_loss'] - result['val_loss']:.2f} nats below")
    console.print("[bold]sample:[/bold]")
    console.print("def " + text, markup=False, highlight=False)
    console.print(f"plot: {png}")
    console.print(f"lm part took {time.perf_counter() - t0:.0f}s")
    return {"val_loss": result["val_loss"], "unigram": base["unigram_val_loss"], "run_dir": str(run_dir)}


def run_demo(args) -> int:
    out, data_root = Path(args.out), Path(args.data)
    t0 = time.perf_counter()
    lm = None if args.skip_lm else run_lm(out, data_root, args.steps, args.corpus_bytes)
    drive = None
    if not args.skip_drive:
        try:
            demo = importlib.import_module("exaflop.drive.demo")
        except ModuleNotFoundError as e:
            console.print(f"[yellow]driving part skipped: {e.name} is not installed "
                          "(pip install 'exaflop[sim]')")
        else:
            console.rule("[bold]driving")
            rehearsal = {"closed_loop": (2, 6.0)} if args.steps else {}  # seconds, not a minute
            drive = demo.run_demo(out, data_root / "drive-sim", episodes=args.episodes or None,
                                  steps=args.steps or None, **rehearsal)
    console.rule("[bold]next")
    if lm:
        run = lm["run_dir"]
        console.print(f"  exaflop sample {run} --prompt 'import os\\n' --temperature 0.8")
        console.print(f"  exaflop serve {run}            # OpenAI-compatible API on 127.0.0.1:8000")
        console.print("  exaflop train lm-small --set train.steps=500   # after: exaflop data text --vocab 8192 --out data/stdlib-8k")
        console.print(f"  exaflop train lm-tiny --nproc 2 --set run.name=ddp --set run.out_dir={out}")
    console.print("  exaflop plan --model llama3-405b --accel h100-sxm --n 16384")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    if args.steps:
        console.print(f"[yellow]--steps {args.steps}: a rehearsal; the baseline checks are not enforced")
        return 0
    if lm and lm["val_loss"] >= lm["unigram"]:
        raise UserError("demo: the model did not beat the unigram baseline; something is wrong")
    if isinstance(drive, dict) and drive.get("beats_baselines") is False:
        raise UserError("demo: the driving model did not beat both baselines")
    return 0
