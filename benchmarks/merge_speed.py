"""How fast evomerge applies one merge candidate, against mergekit and against a memory copy.

Builds (once, under --workdir) a model of SmolLM2-135M's shape with random weights, full experts
(base + noise) and PEFT-format LoRA adapters (r=8 on every linear of every layer), then reports:

1. seconds to apply one candidate in place (MergeEngine.apply): LoRA ``evo`` and ``evo_tv`` over
   all adapters, TIES and task arithmetic over full task vectors, TIES and DARE over the adapters'
   materialised updates; and mergekit 0.1.5's
   ``run_merge`` of the same merge in the same run (in-process, so without its CLI start-up):
   TIES / task arithmetic over the full experts, and task arithmetic over ``base+lora`` models
   (what a mergekit user does with adapters; α=1 evo_tv is the same merge);
2. the TIES merge's bytes/s (read base + N experts, write one model) against torch.clone of the
   same number of bytes;
3. peak memory of a full-task-vector merge (--scan-method) as the expert count grows (each count in a fresh
   process): anonymous memory and file-backed resident pages (what memory-mapped experts would
   add; anonymous memory stays flat, file-backed pages grow with what the maps page in).

Usage: python benchmarks/merge_speed.py [--workdir /tmp/evobench] [--counts 4,16,32] [--lora 18]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.recipe import MergeRecipe  # noqa: E402
from evomerge.repository import Repository  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_base(path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def build_full(base: Path, path: Path, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in load_file(str(base / "model.safetensors")).items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text((base / "config.json").read_text())


def build_lora(base: Path, path: Path, seed: int, r: int = 8) -> None:
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in TARGETS:
            kind = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{t}"
            out_f, in_f = shapes[t]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "base_model_name_or_path": str(base), "bias": "none"}))


def ensure_zoo(work: Path, n_full: int, n_lora: int) -> None:
    base = work / "base"
    if not (base / "model.safetensors").exists():
        build_base(base)
    for k in range(n_full):
        if not (work / "full" / f"f{k}").exists():
            build_full(base, work / "full" / f"f{k}", seed=100 + k)
    for k in range(n_lora):
        if not (work / "lora" / f"l{k}").exists():
            build_lora(base, work / "lora" / f"l{k}", seed=200 + k)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    """Median seconds of fn(rep), the device drained before each clock read."""
    times = []
    for r in range(reps):
        sync()
        start = time.perf_counter()
        fn(r)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mergekit_seconds(work: Path, method: str, models: list[str], reps: int, density: float | None = None,
                     cuda: bool = False) -> list[float]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    entries = [{"model": m, "parameters": {"weight": 0.3, **({"density": density} if density else {})}} for m in models]
    config = MergeConfiguration.model_validate({"merge_method": method, "base_model": str(work / "base"),
                                                "models": entries, "dtype": "float32"})
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, cuda=cuda,
                           lora_merge_cache=str(work / "mk_lora_cache"))
    out = []
    for r in range(reps):
        start = time.perf_counter()
        run_merge(config, str(work / f"mk_out_{method}_{r}"), options)
        out.append(time.perf_counter() - start)
    return out


def clone_seconds(numel: int, copies: int, device: str) -> float:
    x = torch.randn(numel, device=device)
    x.clone()
    return timed(lambda r: [x.clone() for _ in range(copies)], 3)


class PeakMemory:
    """Samples /proc/self/status every few ms: peak RssAnon and RssFile in MiB."""

    def __init__(self) -> None:
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.anon = max(self.anon, int(line.split()[1]) / 1024)
            elif line.startswith("RssFile:"):
                self.file = max(self.file, int(line.split()[1]) / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def rss_child(work: Path, n: int, method: str) -> None:
    """One merge over n full experts in this fresh process; prints a JSON line."""
    from evomerge.merging import MergeEngine

    names = [f"f{k}" for k in range(n)]
    repo = Repository.from_paths(work / "base", experts=[work / "full" / x for x in names], check_finite=False)
    with PeakMemory() as before:
        engine = MergeEngine(repo, device="cpu", dtype="float32")
    with PeakMemory() as peak:
        start = time.perf_counter()
        engine.apply(MergeRecipe(method, tuple(names), (1.0 / n,) * n, (0.5,) * n))
        seconds = time.perf_counter() - start
    print(json.dumps({"method": method, "experts": n, "seconds": round(seconds, 2), "anon_after_load_mib": round(before.anon),
                      "peak_anon_mib": round(peak.anon), "peak_file_mib": round(peak.file)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evobench"))
    ap.add_argument("--full", type=int, default=4, help="full experts in the speed comparison")
    ap.add_argument("--lora", type=int, default=18, help="LoRA adapters in the speed comparison")
    ap.add_argument("--counts", default="4,16,32", help="expert counts of the memory scan")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--device", default="cpu", help="merge device of evomerge and mergekit (cpu or cuda)")
    ap.add_argument("--scan-method", default="task_arithmetic", help="merge method of the memory scan")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--only", choices=("speed", "memory"), default=None)
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        rss_child(work, args.rss_child, args.scan_method)
        return
    counts = [int(c) for c in args.counts.split(",") if c] if args.only != "speed" else []
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU"
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device} ({gpu})", flush=True)
    start = time.perf_counter()
    ensure_zoo(work, max([args.full] + counts), args.lora)
    print(f"zoo ready under {work} in {time.perf_counter() - start:.0f} s", flush=True)
    if args.only != "memory":
        speed(work, args)
    if counts:
        print(f"\n## memory of a full {args.scan_method} merge vs expert count (fresh process each)", flush=True)
    for n in counts:
        out = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--rss-child", str(n),
                              "--scan-method", args.scan_method] + (["--threads", str(args.threads)] if args.threads else []),
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


def speed(work: Path, args: argparse.Namespace) -> None:
    """Sections 1 and 2: seconds per candidate against mergekit, bandwidth against a copy."""
    from evomerge.merging import MergeEngine

    full = [f"f{k}" for k in range(args.full)]
    lora = [f"l{k}" for k in range(args.lora)]
    n_l, n_f = len(lora), len(full)
    repo = Repository.from_paths(work / "base", experts=[work / "full" / x for x in full] + [work / "lora" / x for x in lora])
    engine = MergeEngine(repo, device=args.device, dtype="float32")
    numel = sum(p.numel() for p in engine.model.parameters())
    cases = {
        f"lora evo ({n_l} adapters)": lambda r: MergeRecipe("evo", tuple(lora), (1 / n_l + r * 1e-3,) * n_l, (0.7,) * n_l),
        f"lora evo_tv alpha=1 ({n_l} adapters)": lambda r: MergeRecipe("evo_tv", tuple(lora), (0.3 + r * 1e-3,) * n_l),
        f"full task_arithmetic ({n_f} experts)": lambda r: MergeRecipe("task_arithmetic", tuple(full), (0.3 + r * 1e-3,) * n_f),
        f"full ties d=0.5 ({n_f} experts)": lambda r: MergeRecipe("ties", tuple(full), (0.3 + r * 1e-3,) * n_f, (0.5,) * n_f),
        f"lora ties d=0.5 ({n_l} adapters)": lambda r: MergeRecipe("ties", tuple(lora), (0.3 + r * 1e-3,) * n_l, (0.5,) * n_l),
        f"lora dare d=0.5 ({n_l} adapters)": lambda r: MergeRecipe("dare", tuple(lora), (0.3 + r * 1e-3,) * n_l, (0.5,) * n_l),
    }
    # warm-up: the first apply also copies the base weights it touches (and, on a GPU, makes the
    # full experts resident), once per engine
    engine.apply(MergeRecipe("task_arithmetic", tuple(full + lora), (0.1,) * (n_f + n_l)))
    print("\n## evomerge: seconds per candidate applied in place (median)", flush=True)
    ours = {}
    for name, make in cases.items():
        ours[name] = timed(lambda r: engine.apply(make(r)), args.reps)
        print(f"{name:42s} {ours[name]:8.3f} s", flush=True)
    engine.close()

    moved = (n_f + 2) * numel * 4
    clone = clone_seconds(numel, n_f + 2, args.device)
    print(f"\n## bandwidth: a {n_f}-expert merge moves {moved / 1e9:.2f} GB (read base + {n_f} experts, write one)")
    print(f"torch.clone of the same bytes   {clone:7.3f} s  {moved / clone / 1e9:6.2f} GB/s")
    for name in (f"full task_arithmetic ({n_f} experts)", f"full ties d=0.5 ({n_f} experts)"):
        print(f"{name:32s}{ours[name]:7.3f} s  {moved / ours[name] / 1e9:6.2f} GB/s  ({ours[name] / clone:.1f}x the copy)",
              flush=True)
    if args.skip_mergekit:
        return
    print("\n## mergekit 0.1.5 run_merge of the same merge (in-process, writes its output)", flush=True)
    mk_cases = [(f"full task_arithmetic ({n_f} experts)", "task_arithmetic", [str(work / "full" / x) for x in full], None),
                (f"full ties d=0.5 ({n_f} experts)", "ties", [str(work / "full" / x) for x in full], 0.5),
                (f"lora evo_tv alpha=1 ({n_l} adapters)", "task_arithmetic",
                 [f"{work / 'base'}+{work / 'lora' / x}" for x in lora], None)]
    for name, method, models, density in mk_cases:
        mk = mergekit_seconds(work, method, models, args.reps, density, cuda=args.device == "cuda")
        print(f"{name:42s} mergekit {', '.join(f'{x:.2f}' for x in mk)} s   evomerge {ours[name]:.3f} s   "
              f"ratio {min(mk) / ours[name]:.1f}x", flush=True)


if __name__ == "__main__":
    main()
