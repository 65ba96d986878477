"""What a language-model run needs at inference, kept inside the run directory.

Training copies the tokenizer (with the special tokens it defines), an imported model's
tokenizer / generation configs (chat template, eos) and the data manifest's summary into
`RUN/tokenizer/`. Sampling, serving, export and `import run` read that folder, so a run
copied to another machine or folder works without the training data, from any working
directory, and from read-only storage (nothing here writes at load time).

Runs made before this layout have no `RUN/tokenizer/`: they still load through
`data.path` (relative to the working directory, the run or its parents) with a one-line
hint to re-save, and fail with a one-line error naming the missing file where that data
is gone too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from exaflop.errors import UserError
from exaflop.progress import console

ASSETS = "tokenizer"
# Files of a data directory that inference reads (HF names: see lm/hf.py).
FILES = ("tokenizer.json", "hf_tokenizer_config.json", "hf_generation_config.json")
_hinted: set[str] = set()


def save_assets(data_path: str | Path, run_dir: Path) -> Path:
    """Copy the tokenizer files and a shard-less manifest into RUN/tokenizer/ (atomically)."""
    data_path, run_dir = Path(data_path), Path(run_dir)
    dest = run_dir / ASSETS
    manifest = json.loads((data_path / "manifest.json").read_text())
    manifest["shards"] = {split: [] for split in manifest.get("shards", {})}  # the run holds no data
    manifest["copied_from"] = str(data_path.resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    if _same(data_path, dest, manifest):  # a resume: nothing to rewrite
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{ASSETS}.", dir=run_dir))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); a run is copied and shared
    try:
        for name in FILES:
            if (data_path / name).is_file():
                shutil.copyfile(data_path / name, tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        old = run_dir / f".{ASSETS}.old"
        if dest.exists():  # replace as one rename; the previous copy stays until the new one is in
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _same(data_path: Path, dest: Path, manifest: dict) -> bool:
    try:
        if json.loads((dest / "manifest.json").read_text()) != manifest:
            return False
        return all((dest / n).is_file() and (dest / n).read_bytes() == (data_path / n).read_bytes()
                   for n in FILES if (data_path / n).is_file())
    except (OSError, ValueError):
        return False


def _legacy_data_dir(cfg, run_dir: Path) -> Path | None:
    rel = Path(cfg.data.path)
    for base in (Path.cwd(), run_dir, run_dir.parent, run_dir.parent.parent):
        p = rel if rel.is_absolute() else base / rel
        if (p / "tokenizer.json").is_file():
            return p
    return None


def tokenizer_dir(cfg, run_dir: str | Path) -> Path:
    """The folder holding the run's tokenizer.json (+ HF configs, manifest.json)."""
    run_dir = Path(run_dir)
    own = run_dir / ASSETS
    if (own / "tokenizer.json").is_file():
        return own
    if (run_dir / "tokenizer.json").is_file():  # hand-copied, as older docs suggested
        return run_dir
    legacy = _legacy_data_dir(cfg, run_dir)
    if legacy is None:
        raise UserError(f"{run_dir}: no {ASSETS}/tokenizer.json in the run (it predates self-contained runs) "
                        f"and data.path {cfg.data.path}/tokenizer.json is not found; copy the training "
                        f"data's tokenizer.json and manifest.json into {own}/")
    if str(run_dir) not in _hinted:
        _hinted.add(str(run_dir))
        console.print(f"[yellow]{run_dir}: an older run without {ASSETS}/; using {legacy}. Make it "
                      f"self-contained: mkdir {own} && cp {legacy}/tokenizer.json {legacy}/manifest.json {own}/",
                      highlight=False, soft_wrap=True)
    return legacy


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; the run's tokenizer folder needs the data manifest beside "
                        "tokenizer.json")
    return json.loads(path.read_text())
