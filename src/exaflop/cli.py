"""The `exaflop` command. Thin: parses arguments and calls into the packages."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from pathlib import Path

from exaflop.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other user mistake."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config (lm or drive)")
    p.add_argument("config", help="a TOML file or preset name (lm-tiny, lm-small, drive-tiny, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest complete checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if the run has a complete checkpoint, else start fresh (requeued jobs)")
    p.add_argument("--record-samples", action="store_true",
                   help="write RUN/samples_rank<r>.jsonl with the global sample ids of every step")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts after a rank dies; with --elastic: replacements that join the "
                        "running group for lost replicas")
    p.add_argument("--elastic", action="store_true",
                   help="with --nproc: data-parallel replicas that lose a member go on without it "
                        "(no restart, no checkpoint load; docs/distributed.md)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from exaflop.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before launching anything
    if args.record_samples:
        os.environ["EXAFLOP_RECORD_SAMPLES"] = "1"  # inherited by torchrun's workers
    if args.auto_resume:
        from exaflop.engine.checkpoint import read_latest

        args.resume = read_latest(cfg.run_dir / "checkpoints")[0] is not None
    if args.elastic:
        if args.nproc < 2:
            raise UserError("--elastic needs --nproc 2 or more")
        from exaflop.engine.elastic import launch as launch_elastic

        return launch_elastic(args.config, args.overrides, args.nproc, args.resume, args.quiet,
                              replacements=args.max_restarts)
    if args.nproc > 1:
        from exaflop.engine.launch import launch

        return launch(args.config, args.overrides, args.nproc, args.max_restarts, args.resume, args.quiet)
    from exaflop.engine.trainer import train_main

    result = train_main(cfg, resume=args.resume, quiet=args.quiet)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    from exaflop.progress import console

    keys = [k for k in ("val_loss", "val_bpb", "val_ade") if k in result]
    summary = ", ".join(f"{k} {result[k]:.4f}" for k in keys)
    state = "stopped early (checkpoint saved)" if result.get("stopped_early") else "done"
    console.print(f"{state} at step {result['step']}{': ' + summary if summary else ''} -> {result['run_dir']}")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="import and shard datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=Parser)
    t = dsub.add_parser("text", help="tokenize a text corpus into packed shards")
    t.add_argument("--source", default="stdlib",
                   help="'stdlib' (default: the Python standard library), a directory of .txt/.md/.py, "
                        "a .jsonl or a .parquet file")
    t.add_argument("--out", default="data/stdlib", help="output directory")
    t.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size to train")
    t.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    t.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text")
    t.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out")
    t.add_argument("--max-bytes", type=int, default=0, help="stop reading the corpus after this many bytes")
    t.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_data_text)
    _mount("exaflop.drive.cli", "add_data_parser", dsub)
    _mount("exaflop.lm.sft", "add_data_parser", dsub)


def _cmd_data_text(args) -> int:
    from exaflop.lm.shards import build_text_dataset
    from exaflop.progress import console

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    m = build_text_dataset(args.source, args.out, args.vocab, args.tokenizer, args.field,
                           args.val_fraction, args.shard_tokens, args.max_bytes, args.quiet)
    s = m["stats"]
    console.print(f"{args.out}: {m['tokens']['train']:,} train / {m['tokens']['val']:,} val tokens from "
                  f"{m['documents']['train'] + m['documents']['val']:,} documents, vocab {m['vocab_size']}, "
                  f"{m['dtype']}; skipped {s['skipped_binary']} binary, {s['skipped_json']} bad JSON, "
                  f"{s['skipped_empty']} empty; {s['replaced_utf8']} decoded with replacement")
    for w in m["warnings"][:5]:
        console.print(f"[yellow]warning: {w}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained language model")
    p.add_argument("run", help="run directory (runs/<name>) or checkpoint directory")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None,
                   help="compute precision (default: the run's run.dtype, normally auto: bf16 where "
                        "this CPU runs bf16 matmuls fast, fp32 elsewhere)")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    from exaflop.lm.sample import sample_text

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("sample: need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    text = sample_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, dtype=args.dtype)
    print(args.prompt + text)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG of loss and throughput for a run")
    p.add_argument("run")
    p.add_argument("--out", help="PNG path (default: RUN/plots/loss.png)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from exaflop.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's model: safetensors, hf, gguf")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("out", help="output file or directory")
    p.add_argument("--format", required=True, choices=["safetensors", "hf", "gguf"])
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16", "q8_0"],
                   help="GGUF tensor type (gguf only)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    modules = {"safetensors": "exaflop.engine.export", "hf": "exaflop.lm.hf", "gguf": "exaflop.lm.gguf_export"}
    try:
        mod = importlib.import_module(modules[args.format])
    except ModuleNotFoundError as e:
        raise UserError(f"export --format {args.format}: not available ({e.name} missing)") from None
    out = mod.export(args.run, args.out, **({"dtype": args.dtype} if args.format == "gguf" else {}))
    print(out)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: train tiny LM (and driving) models on embedded data")
    p.add_argument("--out", default="runs", help="where runs go")
    p.add_argument("--skip-drive", action="store_true", help="only the language-model part")
    p.add_argument("--skip-lm", action="store_true", help="only the driving part")
    p.add_argument("--data", default="data", help="where the corpus and the simulated episodes go")
    # A short rehearsal of the whole job (what the smoke test runs); its baseline checks are
    # reported, not enforced, since a few steps need not beat them.
    p.add_argument("--steps", type=int, default=0, help="train each model this many steps (default: the presets')")
    p.add_argument("--episodes", type=int, default=0, help="simulated driving episodes (default 24)")
    p.add_argument("--corpus-bytes", type=int, default=0, help="read at most this much of the standard library")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from exaflop.demo import run_demo

    return run_demo(args)


def _mount(module: str, fn: str, sub) -> None:
    """Attach a package's sub-commands; a package that is not installed is simply absent."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return
        raise
    getattr(mod, fn)(sub)


def _add_plan(sub) -> None:
    """`exaflop plan`, with `plan data` (fleet-import sizing) mounted from the driving stack."""
    from exaflop.drive.dataplan import add_parser as add_data_plan
    from exaflop.plan.cli import add_parser

    add_parser(sub, extra=(add_data_plan,))


def build_parser() -> Parser:
    parser = Parser(prog="exaflop", description="The open software of an AI supercomputer.")
    parser.add_argument("--version", action="version", version="exaflop " + _version())
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    _add_demo(sub)
    _add_data(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_plot(sub)
    _add_export(sub)
    _mount("exaflop.lm.hf_import", "add_parser", sub)
    _mount("exaflop.serve.cli", "add_parser", sub)
    _add_plan(sub)
    _mount("exaflop.drive.cli", "add_parser", sub)
    return parser


def _version() -> str:
    from exaflop import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    # DCP warns that it runs without a process group on every single-process save.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"exaflop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exaflop: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # ENOSPC, EFBIG, EDQUOT: say so plainly; checkpoints are written atomically, so the
        # previous one and `latest` are intact.
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(f"exaflop: error: {e.strerror}{where}; nothing already saved was damaged "
                  "(the previous checkpoint is intact) — free space and rerun with --resume", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "Path"]
