"""Captioning speed of the two engines, PyTorch and ONNX Runtime, on the same images.

    python -m captioning.export.speed --checkpoint runs/soft/best.ckpt --model exported/soft \\
        --split test --limit 100 --beam-size 1 3 --threads 1 --repeats 3

Both engines caption the same preprocessed images (loading is left out), with the same thread
count, ``--repeats`` times after one warm-up run; the best time of each is reported as images per
second, with how many captions came out identical.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

from captioning.console import positive_int


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="best.ckpt (or a model folder) for PyTorch")
    p.add_argument("--model", type=Path, required=True, help="the folder 'captioning export --format onnx' wrote")
    p.add_argument("--split", default="test", help="images of this split of the checkpoint's dataset")
    p.add_argument("--limit", type=positive_int, default=100)
    p.add_argument("--beam-size", type=positive_int, nargs="+", default=[1, 3])
    p.add_argument("--threads", type=positive_int, default=1, help="intra-op threads of both engines")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=32)
    args = p.parse_args(argv)

    import torch

    from captioning.caption.run import load_captioner, split_paths
    from captioning.export.runtime import OnnxCaptioner

    torch.set_num_threads(args.threads)
    captioner = load_captioner(args.checkpoint, device="cpu")
    onnx = OnnxCaptioner(args.model, threads=args.threads)
    paths = split_paths(captioner, args.split, args.limit, data_root=None)  # as captioning caption --from-split
    batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    engines = {"torch": captioner, "onnx": onnx}
    inputs = {name: [e.stack([e.preprocess(p) for p in b]) for b in batches] for name, e in engines.items()}

    def best_time(name: str, beam: int) -> tuple[float, list[list[str]]]:
        """The best time of ``--repeats`` runs after a warm-up, and each image's words."""
        engine, options = engines[name], engines[name].options(beam_size=beam)

        def run() -> list[list[str]]:
            return [engine.vocab.decode(pool[0].tokens) for x in inputs[name] for pool in engine.search(x, options)]

        words = run()  # and the warm-up
        return min(timeit.repeat(run, number=1, repeat=args.repeats)), words

    rows = []
    print(f"{len(paths)} images, {args.threads} thread(s), best of {args.repeats}")
    for beam in args.beam_size:
        t_torch, w_torch = best_time("torch", beam)
        t_onnx, w_onnx = best_time("onnx", beam)
        same = sum(a == b for a, b in zip(w_torch, w_onnx))
        row = {"beam_size": beam, "images": len(paths), "torch_images_per_s": len(paths) / t_torch,
               "onnx_images_per_s": len(paths) / t_onnx, "identical": same}
        rows.append(row)
        print(f"beam {beam}: PyTorch {row['torch_images_per_s']:.1f} images/s, ONNX Runtime "
              f"{row['onnx_images_per_s']:.1f} images/s, {same}/{len(paths)} captions identical")
    return rows


if __name__ == "__main__":
    from captioning.console import guarded  # its one-line errors and exit statuses, as every command's

    sys.exit(guarded(main))
