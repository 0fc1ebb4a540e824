"""`evomerge zoo build`: make the demo and benchmark repository from the command line."""

from __future__ import annotations

import argparse

from evomerge.zoo.presets import PRESETS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `zoo` command (with its `build` subcommand) to the evomerge CLI."""
    zoo = subparsers.add_parser("zoo", help="build a model zoo (base model, LoRA experts, task files)")
    actions = zoo.add_subparsers(dest="zoo_command", required=True)
    build = actions.add_parser("build", help="build or reuse a zoo directory (deterministic by seed)")
    build.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                       help="tiny: byte-level model trained here (~2 min); smol: SmolLM2-135M (tens of minutes); "
                            "smol-mini: SmolLM2 with 4 experts and 2 distractors (~7 min); "
                            "smol-128: smol's 8 experts and 120 distractors of 3 steps each")
    build.add_argument("--out", required=True, help="zoo directory to write (reused when already built)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--gguf", default=None, help="local SmolLM2-135M-Instruct GGUF file (smol preset)")
    build.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    build.add_argument("--device", default="cpu", help="train on this torch device, e.g. cuda (default: cpu)")
    build.add_argument("--force", action="store_true", help="rebuild even if OUT holds a zoo")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=run_build)
    export = actions.add_parser("export-gguf", help="write the base and LoRA experts as GGUF files llama.cpp loads")
    export.add_argument("zoo", help="a zoo or base/ + experts/ folder (Llama base, PEFT LoRA experts)")
    export.add_argument("out", help="folder to write base.gguf and experts/NAME.gguf into")
    export.set_defaults(func=run_export_gguf)
    serve = actions.add_parser("serve-gguf", help="serve an export-gguf folder with llama.cpp's server (xllamacpp)")
    serve.add_argument("gguf_dir", help="a folder written by export-gguf")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    serve.add_argument("--parallel", type=int, default=2, help="requests served at once (slots; default: 2)")
    serve.set_defaults(func=run_serve_gguf)
    return zoo


def run_build(args: argparse.Namespace) -> int:
    """Call the Python API and print the zoo's path."""
    from evomerge.zoo import build

    path = build(args.preset, args.out, args.seed, gguf=args.gguf, threads=args.threads, device=args.device,
                 force=args.force, progress=not args.no_progress)
    print(path)
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    """Convert, then print each file written."""
    from evomerge.zoo.gguf_export import export_gguf

    base, experts = export_gguf(args.zoo, args.out)
    for path in (base, *experts.values()):
        print(path)
    return 0


def run_serve_gguf(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from evomerge.zoo.llamacpp import serve_forever

    serve_forever(args.gguf_dir, args.port, threads=args.threads, parallel=args.parallel)
    return 0
