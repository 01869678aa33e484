"""Measure training, encoding, decoding and loading speed on this machine; write JSON, print tables.

    captioning benchmark                              # every section, COCO sizes, best device
    captioning benchmark --sections train --batches 32 --attention soft --reps 5
    captioning benchmark --sections train --compile none step   # eager vs torch.compile
    captioning benchmark --device cuda --out bench-h100.json  # that file only
    captioning benchmark --sections loader --loader-root prepared/coco
    captioning benchmark --quick                      # tiny sizes, seconds (used by the tests)

The sections are captioning/perf/benchmark.py's; docs/performance.md ("The benchmark command")
says what each measures and where the results go.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from captioning.config import BACKBONES, COMPILE_TARGETS
from captioning.console import CommandFailed, command_line, main_of

SECTIONS = ("matmul", "train", "encoder", "beam", "loader")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the JSON results file, written there only (default: runs/benchmark/benchmark.json, in "
                        "a folder the benchmark marks as its own and writes nothing else into)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke test in seconds")
    p.add_argument("--batches", type=int, nargs="+", help="training-step batch sizes in captions (default 32 128)")
    p.add_argument("--attention", nargs="+", choices=["soft", "hard"], default=["soft", "hard"])
    p.add_argument("--captions-per-image", type=int, default=1,
                   help="captions sharing one image's grid in the training step (default 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA (as training's bf16-mixed), fp32 on CPU")
    p.add_argument("--compile", nargs="+", choices=COMPILE_TARGETS, default=["none"],
                   help="torch.compile targets to time the training step with (e.g. none step)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--reps", type=int, help="timed repetitions per measurement (default 3; --quick 1)")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, help="encoder section (default: all)")
    p.add_argument("--beam-images", type=int, help="images decoded at once (default 100)")
    p.add_argument("--sequential-images", type=int,
                   help="images decoded one at a time for the comparison (default: all of --beam-images)")
    p.add_argument("--beam-max-len", type=int, help="maximum caption length in beam search (default 20)")
    p.add_argument("--loader-root", help="a prepared folder (captioning prepare) for the loader section")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: PyTorch's choice; --quick: 1)")
    return p.parse_args(argv)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["n/a" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(results: dict[str, Any]) -> str:
    """The printed tables (the JSON holds more)."""
    out = []
    m = results["machine"]
    out.append(f"device {m['device']} ({m['gpu'] or m['cpu']}), {m['torch_threads']} torch threads, torch {m['torch']}"
               + (f", load average {m['load_average_1min']}" if "load_average_1min" in m else "")
               + f", malloc {m['malloc']}")
    for key, mm in results.get("matmul", {}).items():
        sizes = ", ".join(f"{n}: {g}" for n, g in mm["gflops_by_size"].items())
        out.append(f"matmul {key}: best {mm['best_gflops']} GFLOP/s (n = {sizes})")
    if results.get("train"):
        grids = f"{results['sizes']['locations']}x{results['sizes']['feature_dim']}"
        out.append(f"\nteacher-forced training step (random {grids} grids as input; fwd+loss, bwd, clip+Adam)")
        out.append(_table(
            ["attention", "batch", "prec", "compile", "fwd ms", "bwd ms", "opt ms", "step ms", "captions/s",
             "tokens/s", "GFLOP/capt", "GFLOP/s", "% matmul", "peak MiB"],
            [[r["attention"].split()[0], r["batch_captions"], r["precision"], r["compile"], r["forward_ms"],
              r["backward_ms"], r["optimizer_ms"], r["step_ms"], r["captions_per_s"], r["tokens_per_s"],
              r["useful_gflop_per_caption"], r["achieved_gflops"], round(100 * r["fraction_of_matmul"], 1),
              r["peak_memory_mib"]] for r in results["train"]]))
        out.append("step ms, captions/s, tokens/s: medians. GFLOP/capt: useful matmul FLOPs (fwd+bwd) per caption. "
                   "GFLOP/s and % matmul: useful FLOPs at the best step, over the best matmul GFLOP/s above.")
        out.append(f"Peak memory: {results['train_memory_method']}.")
    if results.get("encoder"):
        grid = int(results["sizes"]["locations"] ** 0.5)
        out.append(f"\nencoder forward (random weights, frozen, the last stage pooled to {grid}x{grid})")
        out.append(_table(["backbone", "size", "batch", "grid", "ms/batch", "images/s", "GFLOP/img", "GFLOP/s"],
                          [[r["backbone"], r["image_size"], r["batch"], r["grid"], r["ms_per_batch"], r["images_per_s"],
                            r["gflop_per_image"], r["achieved_gflops"]] for r in results["encoder"]]))
    if results.get("beam"):
        b = results["beam"]
        out.append(f"\nbeam search, beam {b['beam_size']}, max_len {b['max_len']}, {b['vocab_size']:,} words, "
                   f"{b['features']} grids")
        out.append(_table(["decoding", "images", "seconds", "captions/s"],
                          [["batched", b["batched_images"], b["batched_s"], b["batched_captions_per_s"]],
                           ["one at a time", b["sequential_images"], b["sequential_s"], b["sequential_captions_per_s"]]]))
        out.append(f"speed-up {b['speedup']}x (best of {b['reps']} alternating runs each); "
                   f"same captions both ways: {b['same_captions']}; {b['note']}")
        if "speedup_ceiling" in b:
            out.append(f"batched: {b['batched_gflop_per_image']} GFLOP of matrix products per image, run at "
                       f"{100 * b['batched_fraction_of_matmul']:.1f}% of the fp32 matmul rate above; ceiling on this "
                       f"machine (every product at that rate, nothing else, against the measured one-at-a-time "
                       f"time): {b['speedup_ceiling']}x")
    if "loader" in results:
        loader = results["loader"]
        if "skipped" in loader:
            out.append(f"\ndata loader: skipped: {loader['skipped']}")
        else:
            rows = loader["results"]  # a dict per worker count
            keys = list(rows[0]) if rows else []
            out.append(f"\ndata loader ({loader['root']})")
            out.append(_table(keys, [[r.get(k) for k in keys] for r in rows]))
    if results.get("skipped"):
        out.append("\nskipped: " + "; ".join(results["skipped"]))
    return "\n".join(out)


#: Where results go without --out: a folder of the benchmark's own.
DEFAULT_FOLDER = Path("runs") / "benchmark"


def results_file(out: Path | None) -> Path:
    """The JSON file to write: ``out`` (its folder created if missing), or benchmark.json in
    :data:`DEFAULT_FOLDER`, claimed with the project's marker (captioning/files.py). An ``out`` that
    :func:`results_file_problem` refuses, or a folder of someone else's, raises CommandFailed."""
    from captioning.files import FileWriteError, ForeignFolderError, check_writable, claim_folder

    if out is not None and (reason := results_file_problem(out)):
        raise CommandFailed(reason)
    try:
        if out is None:
            return claim_folder(DEFAULT_FOLDER, "benchmark", "--out FILE") / "benchmark.json"
        check_writable(out.parent)
    except (ForeignFolderError, FileWriteError) as err:
        raise CommandFailed(err) from None
    return out


def results_file_problem(out: Path) -> str | None:
    """Why ``out`` may not be written (files.result_file_problem: a benchmark's own result may be), or None."""
    from captioning.files import result_file_problem

    return result_file_problem(out, "--out", lambda data: isinstance(data, dict) and "total_seconds" in data
                               and "skipped" in data, "a benchmark result written by show-attend-tell",
                               "benchmark.json")


def run(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """``captioning benchmark`` with ``argv``; -> what it wrote, as a dict. Raises CommandFailed (status 1)."""
    args = parse_args(argv, prog)  # first: --help answers without importing torch
    out = results_file(args.out)  # before the long measurements
    import torch

    from captioning.device import resolve_device
    from captioning.perf import benchmark as bench
    from captioning.perf.compile import compile_unsupported_reason

    if args.threads or args.quick:  # --quick: tiny tensors run faster on one thread of a shared CPU
        torch.set_num_threads(args.threads or 1)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise CommandFailed(err) from None
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    sizes = bench.QUICK if args.quick else bench.COCO
    sizes = bench.with_overrides(sizes, beam_images=args.beam_images, beam_max_len=args.beam_max_len)
    reps = args.reps or (1 if args.quick else 3)
    batches = args.batches or ([4, 8] if args.quick else [32, 128])
    sections = [s for s in SECTIONS if s in args.sections]
    if "train" in sections and "matmul" not in sections:
        sections.insert(0, "matmul")  # the training step's FLOP/s are reported as a fraction of it
    results: dict[str, Any] = {"command": command_line(prog or "captioning benchmark", argv),
                               "machine": bench.machine_info(device), "sizes": asdict(sizes),
                               "precision": precision, "skipped": []}
    compile_targets = list(args.compile)
    if any(t != "none" for t in compile_targets):
        reason = compile_unsupported_reason()
        if reason:
            results["skipped"].append(f"compiled training steps ({reason})")
            compile_targets = [t for t in compile_targets if t == "none"]

    items: dict[str, list[Any]] = {
        "train": [(a, b, c) for c in compile_targets for a in args.attention for b in batches],
        "encoder": args.backbones or (["resnet18", "vgg11"] if args.quick else list(BACKBONES))}
    plan = [(section, item) for section in sections for item in items.get(section, [None])]

    started = time.perf_counter()
    for i, (section, item) in enumerate(plan):
        label = f"{section} {item}" if item is not None else section
        print(f"[{i + 1}/{len(plan)}] {label} ...", file=sys.stderr, flush=True)
        if section == "matmul":
            seconds = 0.2 if args.quick else 1.0
            sizes_mm = (128, 256) if args.quick else (512, 1024, 2048)
            results["matmul"] = {"fp32": bench.matmul_throughput(device, torch.float32, sizes_mm, seconds)}
            if precision == "bf16":
                results["matmul"]["bf16"] = bench.matmul_throughput(device, torch.bfloat16, sizes_mm, seconds)
        elif section == "train":
            attention, batch, target = item
            peak = results["matmul"]["bf16" if precision == "bf16" else "fp32"]["best_gflops"]
            row = bench.train_step(sizes, attention, batch, device, peak, captions_per_image=args.captions_per_image,
                                   precision=precision, compile_target=target, compile_mode=args.compile_mode,
                                   reps=reps)
            results.setdefault("train", []).append(row)
            results["train_memory_method"] = bench.CUDA_MEMORY_METHOD if device.type == "cuda" else bench.CPU_MEMORY_METHOD
        elif section == "encoder":
            results.setdefault("encoder", []).append(
                bench.encoder_forward(item, sizes, device, precision, reps=max(1, reps - 1)))
        elif section == "beam":
            fp32 = results.get("matmul", {}).get("fp32", {}).get("best_gflops")
            results["beam"] = bench.beam_search_speedup(sizes, device, args.sequential_images, reps=reps,
                                                        matmul_gflops=fp32)
        elif section == "loader":
            results["loader"] = bench.data_loader(args.loader_root, tuple(args.loader_workers),
                                                  seconds=2.0 if args.quick else 5.0)
        elapsed = time.perf_counter() - started
        eta = elapsed / (i + 1) * (len(plan) - i - 1)
        print(f"[{i + 1}/{len(plan)}] {label}: done, elapsed {elapsed:.0f}s, ETA ~{eta:.0f}s", file=sys.stderr,
              flush=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)

    from captioning.files import atomic_write_json

    try:
        atomic_write_json(out, results)  # replaces the name, never writes through a link
    except OSError as err:  # FileWriteError too
        raise CommandFailed(f"cannot write {out}: {err}") from None
    print(format_report(results))
    print(f"wrote {out} ({results['total_seconds']} s)")
    return results


main = main_of(run)
