"""`exaflop serve RUN [RUN ...]`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import logging
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory (serves its newest checkpoint, hot-reloading newer ones) or a "
                        "checkpoint directory; the model id is the run name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs API keys)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file with one API key per line (also: EXAFLOP_API_KEYS=k1,k2)")
    p.add_argument("--max-running", type=int, default=32, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences that may wait; beyond it: 503")
    p.add_argument("--prefill-tokens", type=int, default=4096,
                   help="padded prompt tokens prefilled per step (bounds the stall new prompts cause)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="KV-pool memory, beyond every slot at full context, for prompt blocks kept for reuse "
                        "across requests (serve/prefix.py); 0: off")
    p.add_argument("--rate-limit-rpm", type=int, default=0, help="requests per minute per key (0: off)")
    p.add_argument("--rate-limit-tpm", type=int, default=0, help="tokens per minute per key (0: off)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument("--max-header-kb", type=float, default=64.0,
                   help="largest request line + headers (beyond it: 431 and the connection closes)")
    p.add_argument("--max-headers", type=int, default=100, help="most request headers (beyond it: 431)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send its request line and headers (then 408)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its whole request body (then 408)")
    p.add_argument("--auth-fail-limit", type=int, default=20,
                   help="failed authentications per client address per minute before 429 (0: off)")
    p.add_argument("--reload-interval", type=float, default=2.0,
                   help="seconds between checks for a newer checkpoint (0: never reload)")
    p.add_argument("--drive-record-dir", type=Path, metavar="DIR",
                   help="append /v1/drive/predict requests that carry drive_id and t, with their predictions, "
                        "to rotating JSONL files here (training clips once telemetry arrives: "
                        "exaflop data drive records DIR)")
    p.add_argument("--drive-record-mb", type=float, default=64.0, help="rotate the record file at this size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights, and the KV cache unless --kv-dtype (auto: bf16 where the device runs bf16 matmuls fast -- CUDA, "
                        "CPUs with AMX / AVX-512 BF16, measured at start -- fp32 elsewhere)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="KV cache precision (auto: the weights'). bf16 with fp32 weights (what --dtype auto picks "
                        "on CPUs without fast bf16) halves the cache's memory and what decode attention reads, "
                        "as llama.cpp's default 16-bit cache does; outputs change by the keys' and values' rounding")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 matrices, one scale per output row (half bf16's memory; "
                        "changes outputs slightly). Faster at 1-4 concurrent streams, slower from 8 "
                        "(lm-124m, 2 CPU cores: docs/serving.md)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the decode step (1.3-1.9x eager's tokens/s at 1-32 streams, lm-124m bf16 on "
                        "2 CPU cores). auto (default): serve eagerly at once and switch to the compiled step when "
                        "it is ready, compiled beside serving (~70 s cold, ~8 s with inductor's on-disk cache "
                        "warm), or, where the fp32 step operator applies (fp32 on CPUs without fast bf16), decode "
                        "with it at full speed at once; on (or bare --compile): compile before serving; off: never")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _check(args) -> None:
    from exaflop.errors import UserError

    for flag, value, low in (("--max-running", args.max_running, 1), ("--max-queue", args.max_queue, 0),
                             ("--prefill-tokens", args.prefill_tokens, 1), ("--rate-limit-rpm", args.rate_limit_rpm, 0),
                             ("--rate-limit-tpm", args.rate_limit_tpm, 0), ("--threads", args.threads, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be between 1 and 65535")
    if args.drive_record_mb <= 0:
        raise UserError(f"--drive-record-mb {args.drive_record_mb}: must be > 0")
    if args.drive_record_dir is not None:
        try:
            args.drive_record_dir.mkdir(parents=True, exist_ok=True)
            probe = args.drive_record_dir / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--drive-record-dir {args.drive_record_dir}: cannot write there ({e.strerror or e})") from None
    if args.max_body_mb <= 0 or args.reload_interval < 0:
        raise UserError("--max-body-mb must be > 0 and --reload-interval >= 0")
    for flag, value in (("--max-header-kb", args.max_header_kb), ("--max-headers", args.max_headers),
                        ("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if value <= 0:
            raise UserError(f"{flag} {value}: must be > 0")
    if args.auth_fail_limit < 0:
        raise UserError(f"--auth-fail-limit {args.auth_fail_limit}: must be >= 0 (0 turns it off)")


def build_server(args):
    """Validate everything a user can get wrong, then assemble the (not yet started) server."""
    import torch

    from exaflop.config import load_config_file
    from exaflop.errors import UserError
    from exaflop.serve.app import Server
    from exaflop.serve.auth import FailedAuthLimiter, KeyChecker, RateLimiter, check_bind, load_keys
    from exaflop.serve.drive import DrivePredictor, DriveRecorder
    from exaflop.serve.engine import Engine
    from exaflop.serve.http import HTTPLimits
    from exaflop.serve.metrics import Metrics
    from exaflop.serve.reload import Reloader, ServedModel, resolve_run

    _check(args)
    keys = load_keys(args.api_key_file)
    check_bind(args.host, keys)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    from exaflop.engine.precision import resolve
    from exaflop.serve.threads import in_fresh_thread

    threads = args.threads or torch.get_num_threads()
    # The probe's matmuls run in a thread of their own (serve/threads.py: only the engine thread
    # keeps an OpenMP team).
    precision = in_fresh_thread(resolve, args.dtype, device, flag="--dtype", threads=threads)
    dtype = precision.torch_dtype
    if args.quantize == "int8" and device.type != "cpu":
        raise UserError("--quantize int8: CPU serving only (the kernel and its measurements are CPU ones); "
                        "on CUDA serve bf16, or pass --device cpu")
    if args.quantize == "int8" and precision.name != "bf16":
        # `_weight_int8pack_mm` with fp32 activations: 2x slower than fp32 weights at one row (measured,
        # AVX-512 and AVX2 alike), so int8 would only cost accuracy.
        raise UserError(f"--quantize int8: needs bf16 activations, but the precision is {precision.name} "
                        "(--dtype auto picks fp32 where the CPU lacks fast bf16); pass --dtype bf16 on a CPU "
                        "with AVX-512 BF16 / AMX, or drop --quantize")
    kv_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.kv_dtype]
    logging.getLogger("exaflop.serve").info(
        "precision: %s%s, KV cache %s", precision.describe(),
        ", int8 weight-only matrices" if args.quantize == "int8" else "",
        str(kv_dtype or dtype or torch.float32).removeprefix("torch."))
    metrics = Metrics()
    models: dict[str, ServedModel] = {}
    drives: dict[str, DrivePredictor] = {}
    recorder = None
    for run in args.runs:
        name, path, watch = resolve_run(run)
        if name in models or name in drives:
            raise UserError(f"{run}: model id {name!r} is already taken; serve runs with distinct names")
        run_dir = path if watch else path.parent.parent
        if load_config_file(run_dir / "config.toml").task == "drive":
            if recorder is None and args.drive_record_dir is not None:
                recorder = DriveRecorder(args.drive_record_dir, int(args.drive_record_mb * (1 << 20)))
            drives[name] = DrivePredictor(name, path, watch, device, precision.dtype, recorder, threads)
            continue
        engine = Engine(name, metrics, args.max_running, args.max_queue, args.prefill_tokens, args.compile,
                        prefix_cache_mb=args.prefix_cache_mb, threads=threads, quantize=args.quantize,
                        kv_dtype=kv_dtype)
        models[name] = ServedModel(name, path, engine, watch)
    reloader = Reloader(list(models.values()), metrics, device, dtype, args.reload_interval,
                        drives=list(drives.values()), threads=threads)
    limits = HTTPLimits(int(args.max_header_kb * 1024), args.max_headers, args.header_timeout, args.body_timeout)
    return Server(models, metrics, KeyChecker(keys), RateLimiter(args.rate_limit_rpm, args.rate_limit_tpm),
                  reloader, int(args.max_body_mb * (1 << 20)), drives, limits,
                  FailedAuthLimiter(args.auth_fail_limit))


def run(args) -> int:
    import sys

    import uvicorn

    from exaflop.serve.app import create_app
    from exaflop.serve.http import limited_protocol

    # Configured first: building the server logs what it chose (the precision, for one).
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from exaflop.engine.host_memory import huge_pages_for_large_tensors

    # Process-wide, and before the first large tensor (the precision probe's, the weights): PyTorch
    # reads the switch once. Here rather than in build_server, which tests call in their own process.
    pages = huge_pages_for_large_tensors() if args.device != "cuda" else "not asked"
    logging.getLogger("exaflop.serve").info("host memory: huge pages for large tensors: %s", pages)
    server = build_server(args)
    # The engine thread needs the GIL back between torch kernels while the event loop
    # thread writes streams; Python's default 5 ms switch interval would stall it.
    sys.setswitchinterval(0.0005)
    names = ", ".join(server.models)
    auth = "API keys required" if server.keys.enabled else "no API keys (loopback only)"
    print(f"exaflop serve: {names} at http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    protocol = limited_protocol(server.limits, lambda reason: server.metrics.http_refused.inc(reason=reason))
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.log_level == "debug", timeout_graceful_shutdown=5, http=protocol)
    return 0
