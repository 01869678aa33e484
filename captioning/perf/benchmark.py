"""The benchmark sections behind ``captioning benchmark``: each returns plain JSON-able dicts.

* ``matmul``: this machine's dense matrix-multiply throughput (the best of square products at a
  few sizes): the yardstick for the training step's FLOP/s.
* ``train``: the training step (``CaptioningModule.training_loss``, backward, gradient clipping,
  the module's Adam) on the fast or the reference teacher-forced path at COCO sizes, from random
  annotation grids -- the path of training from the feature cache -- with useful FLOPs counted
  analytically (captioning/perf/flops.py), executed FLOPs counted by ``torch.utils.flop_counter``,
  and peak memory.
* ``encoder``: the CNN forward for every supported backbone at the COCO image size.
* ``beam``: batched beam search over a batch of images vs the same code one image at a time.
* ``loader``: the prepared store's training loader.

Timings are medians of repeated runs after a warm-up (the FLOP/s fraction uses the best run, as the
matmul yardstick does); on CUDA every phase is synchronised.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioning.console import InvalidValue
from captioning.config import Config, DecoderConfig, EncoderConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig
from captioning.data.prepare import available_cores
from captioning.device import cpu_name
from captioning.models.captioner import ShowAttendTell
from captioning.models.encoder import Encoder
from captioning.perf.flops import decoder_flops, training_step_flops
from captioning.training.module import CaptioningModule
from captioning.vocab import SPECIALS, Vocabulary


@dataclass(frozen=True)
class Sizes:
    """Problem sizes. ``COCO`` is the paper's COCO setting; ``QUICK`` is for tests (seconds)."""

    locations: int = 196  # 14 x 14 annotation grid
    feature_dim: int = 2048  # ResNet conv5 channels
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    vocab_size: int = 9490  # COCO words seen >= 5 times in Karpathy's train split
    min_tokens: int = 12  # target tokens per caption (words + <end>), drawn uniformly
    max_tokens: int = 18
    dropout: float = 0.5  # arctic's
    backbone: str = "resnet101"  # only sets feature_dim's encoder; the train/beam sections skip it
    stage: str | None = None
    image_size: int = 224
    encoder_batch: int = 4  # CPU; CUDA uses 64
    beam_vocab_size: int = 10_000
    beam_images: int = 100
    beam_size: int = 5
    beam_max_len: int = 20


COCO = Sizes()
# image_size 128: every backbone's last stage (stride 32 at most) then gives at least the 4x4 grid.
QUICK = Sizes(locations=16, feature_dim=128, embed_dim=32, hidden_dim=32, attention_dim=32, vocab_size=200,
              min_tokens=4, max_tokens=7, backbone="resnet18", stage="layer2", image_size=128, encoder_batch=2,
              beam_vocab_size=200, beam_images=6, beam_size=3, beam_max_len=6)


# ------------------------------------------------------------------------------ timing, memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS is close to what is live."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def peak_rss(fn: Callable[[], Any], interval: float = 0.001) -> int:
    """The process's peak RSS in bytes while ``fn()`` runs, sampled every ``interval`` s by a thread
    (torch ops release the GIL)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes() or 0)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes() or 0)


CPU_MEMORY_METHOD = ("peak RSS while one step runs (sampled every 1 ms) minus the RSS before the model, "
                     "optimizer and inputs were built, freed heap returned with malloc_trim first")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated over one step (model, optimizer, inputs, activations)"


def memory_baseline(device: torch.device) -> int:
    """What :func:`peak_memory_mib` measures from: 0 on CUDA (its cache emptied), else the RSS with
    freed heap returned."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return 0
    _malloc_trim()
    return rss_bytes() or 0


def peak_memory_mib(device: torch.device, fn: Callable[[], Any], baseline: int) -> float | None:
    """MiB at the peak of ``fn()`` as CUDA counts it, or (CPU) as RSS growth over ``baseline``; None
    where this platform cannot say."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if rss_bytes() is None:
        fn()
        return None
    gc.collect()
    _malloc_trim()
    return (peak_rss(fn) - baseline) / 2**20


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "cpu": cpu_name(), "cpu_cores": available_cores(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    # glibc's malloc settings this process started with (docs/performance.md, "Around the model").
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    info["malloc"] = ", ".join(tuned) or "glibc defaults"
    with contextlib.suppress(OSError):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


# ------------------------------------------------------------------------------ matmul


def matmul_throughput(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...],
                      seconds: float) -> dict[str, Any]:
    """GFLOP/s of square [n, n] @ [n, n] products; each size runs for about ``seconds``."""
    results = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        first, _ = clock(lambda: a @ b, device)
        reps = max(2, min(200, int(seconds / max(first, 1e-6))))
        times = [clock(lambda: a @ b, device)[0] for _ in range(reps)]
        results[str(n)] = round(2 * n**3 / min(times) / 1e9, 1)
    return {"dtype": str(dtype).replace("torch.", ""), "gflops_by_size": results,
            "best_gflops": max(results.values()), "method": "best of repeated square matmuls per size"}


# ------------------------------------------------------------------------------ training step


def coco_model_config(sizes: Sizes, attention: str) -> ModelConfig:
    return ModelConfig(
        attention=attention,
        encoder=EncoderConfig(backbone=sizes.backbone, stage=sizes.stage, grid_size=int(sizes.locations**0.5),
                              weights="none", fine_tune_from=None),
        decoder=DecoderConfig(embed_dim=sizes.embed_dim, hidden_dim=sizes.hidden_dim,
                              attention_dim=sizes.attention_dim, dropout=sizes.dropout),
    )


def random_captions(n: int, vocab_size: int, min_tokens: int, max_tokens: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """([n, T+1] <start> w.. <end> <pad>.., target tokens per row) with min..max target tokens (words
    + <end>) each, longest first as ``collate_train`` orders a batch of one caption per image."""
    tokens = sorted(torch.randint(min_tokens, max_tokens + 1, (n,), generator=gen).tolist(), reverse=True)
    captions = torch.full((n, max(tokens) + 1), Vocabulary.pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        captions[i, 0] = Vocabulary.start_id
        captions[i, 1:t] = torch.randint(len(SPECIALS), vocab_size, (t - 1,), generator=gen)  # words only
        captions[i, t] = Vocabulary.end_id
    return captions, tokens


def training_setup(sizes: Sizes, attention: str, batch: int, device: torch.device, captions_per_image: int = 1,
                   path: str = "fast", compile_target: str = "none", compile_mode: str = "default",
                   seed: int = 0) -> tuple[CaptioningModule, dict[str, torch.Tensor], list[int], Callable[[], None]]:
    """-> (module, data, tokens, optimise): the LightningModule at ``sizes`` as the benchmark times it
    (the decoder's teacher-forced ``path``, "fast": captioning/fast.py's fused pass, "reference": the
    loop of decoder.py; a constant learning rate, no Trainer to schedule it; hard attention sampling
    at every step) in train mode on ``device`` (its encoder's stages dropped: grids are the input), a
    batch drawn with ``seed`` (random grids [batch // k, L, D], ``batch`` captions and each one's
    target tokens), and ``optimise()``: gradient clipping (as the Trainer's gradient_clip_val), the
    module's optimizer step, zeroed grads."""
    if batch % captions_per_image:
        raise InvalidValue(f"batch {batch} is not a multiple of captions_per_image {captions_per_image}")
    if path not in ("fast", "reference"):
        raise InvalidValue(f"unknown training path '{path}'; choose one of fast, reference")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model_cfg = coco_model_config(sizes, attention)
    model_cfg = replace(model_cfg, decoder=replace(model_cfg.decoder, fast=path == "fast"))
    cfg = Config(model=model_cfg, loss=LossConfig(expected_context_prob=0.0), optim=OptimConfig(schedule="constant"),
                 train=TrainConfig(compile=compile_target, compile_mode=compile_mode))
    words = list(SPECIALS) + [f"w{i}" for i in range(sizes.vocab_size - len(SPECIALS))]
    module = CaptioningModule.create(cfg, Vocabulary(words))
    model = module.model
    if model.encoder.out_channels != sizes.feature_dim:
        raise InvalidValue(f"{sizes.backbone} {sizes.stage} gives {model.encoder.out_channels} channels, not "
                           f"{sizes.feature_dim}")
    model.encoder.stages = torch.nn.Sequential()  # never run here (grids are the input); frees its memory
    module.to(device).train()
    params = list(model.decoder.parameters())
    optimizer = module.configure_optimizers()
    features = torch.randn(batch // captions_per_image, sizes.locations, sizes.feature_dim, generator=gen)
    captions, tokens = random_captions(batch, sizes.vocab_size, sizes.min_tokens, sizes.max_tokens, gen)

    def optimise() -> None:
        torch.nn.utils.clip_grad_norm_(params, module.cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return module, {"images": features.to(device), "captions": captions.to(device)}, tokens, optimise


def train_step(
    sizes: Sizes,
    attention: str,
    batch: int,
    device: torch.device,
    matmul_gflops: float,
    *,
    captions_per_image: int = 1,
    precision: str = "fp32",
    compile_target: str = "none",
    compile_mode: str = "default",
    reps: int = 3,
    seed: int = 0,
    path: str = "fast",
) -> dict[str, Any]:
    """One configuration of the training step (:func:`training_setup`): forward and loss, backward,
    clipping and the optimizer; ``batch`` is captions (batch // k images)."""
    baseline = memory_baseline(device)
    module, data, tokens, optimise = training_setup(sizes, attention, batch, device, captions_per_image, path,
                                                    compile_target, compile_mode, seed)
    # What its training steps sample (hard attention: locations at every step, the REINFORCE path).
    mode = module.mechanism.training_plan(module.cfg.loss, 1, 0, device).mode

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return module.training_loss(data)[0].loss

    def step() -> tuple[float, float, float]:
        t_fwd, loss = clock(forward, device)
        return t_fwd, clock(loss.backward, device)[0], clock(optimise, device)[0]

    first = sum(step())  # warm-up (and compilation)
    peak = peak_memory_mib(device, step, baseline)
    times = [step() for _ in range(reps)]
    fwd, bwd, opt = (statistics.median(t[i] for t in times) for i in range(3))
    total = statistics.median(sum(t) for t in times)
    best = min(sum(t) for t in times)

    with FlopCounterMode(display=False) as counter:  # what one step runs; after the timing, as counting is slow
        forward().backward()
    executed = counter.get_total_flops()
    flops = decoder_flops(module.cfg.model.decoder, sizes.locations, sizes.feature_dim, sizes.vocab_size, mode)
    useful = training_step_flops(flops, tokens, captions_per_image)
    real_tokens = sum(tokens)
    result = {
        "attention": attention + (" (sampled locations)" if mode == "sample" else ""), "path": path,
        "batch_captions": batch, "captions_per_image": captions_per_image, "precision": precision,
        "compile": compile_target if compile_target == "none" else f"{compile_target}/{compile_mode}",
        "tokens": real_tokens, "padded_steps": max(tokens),
        "forward_ms": round(1e3 * fwd, 1), "backward_ms": round(1e3 * bwd, 1), "optimizer_ms": round(1e3 * opt, 1),
        "step_ms": round(1e3 * total, 1), "first_step_s": round(first, 2),
        "captions_per_s": round(batch / total, 1), "tokens_per_s": round(real_tokens / total, 1),
        "useful_gflop_per_caption": round(useful / batch / 1e9, 3),
        "useful_flop_per_step": useful, "executed_flop_per_step": executed,
        "step_s": total, "best_step_s": best,
        # The yardstick is the best matmul rate seen, so the step is compared at its best too (on a
        # shared machine other jobs slow some repetitions down); the median's ratio is kept as well.
        "achieved_gflops": round(useful / best / 1e9, 1),
        "fraction_of_matmul": round(useful / best / 1e9 / matmul_gflops, 4),
        "fraction_of_matmul_median": round(useful / total / 1e9 / matmul_gflops, 4),
        "executed_fraction_of_matmul": round(executed / best / 1e9 / matmul_gflops, 4),
        "peak_memory_mib": None if peak is None else round(peak, 1),
        "reps": reps,
    }
    del module, data, optimise
    if compile_target != "none":
        torch._dynamo.reset()
    return result


# ------------------------------------------------------------------------------ encoder


def encoder_forward(backbone: str, sizes: Sizes, device: torch.device, precision: str, reps: int) -> dict[str, Any]:
    """Images/s of the frozen encoder's forward (random weights, the last stage pooled to the grid
    of ``sizes``: 14x14 at 224 px for COCO)."""
    batch = 64 if device.type == "cuda" else sizes.encoder_batch
    grid = int(sizes.locations**0.5)
    encoder = Encoder(EncoderConfig(backbone=backbone, stage=None, grid_size=grid, weights="none",
                                    fine_tune_from=None)).to(device).eval()
    images = torch.randn(batch, 3, sizes.image_size, sizes.image_size, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return encoder(images)

    with FlopCounterMode(display=False) as counter:
        first, (features, _) = clock(run, device)
    t = statistics.median(clock(run, device)[0] for _ in range(reps))
    flop = counter.get_total_flops()
    return {"backbone": backbone, "image_size": sizes.image_size, "batch": batch, "precision": precision,
            "grid": f"{grid}x{grid}x{features.shape[-1]}", "ms_per_batch": round(1e3 * t, 1),
            "images_per_s": round(batch / t, 1), "gflop_per_image": round(flop / batch / 1e9, 2),
            "achieved_gflops": round(flop / t / 1e9, 1), "reps": reps}


# ------------------------------------------------------------------------------ beam search


def beam_search_speedup(sizes: Sizes, device: torch.device, sequential_images: int | None = None,
                        reps: int = 1, matmul_gflops: float | None = None) -> dict[str, Any]:
    """Captions/s of beam search (``ModelSearch.annotations``) over ``beam_images`` random grids at
    once vs one at a time; the sides alternate ``reps`` times, each one's best time counting (noise
    only adds time). With ``matmul_gflops`` (fp32), also the batched side's matmul FLOPs per image
    (from the decoder rows each step ran) and its speed-up at that rate doing nothing else: a ceiling."""
    from captioning.decoding import ModelSearch, best_captions
    from captioning.search import DecodeOptions

    torch.manual_seed(0)
    cfg = coco_model_config(sizes, "soft")
    model = ShowAttendTell(cfg, sizes.beam_vocab_size)
    model.encoder.stages = torch.nn.Sequential()  # unused: decoding starts from grids
    model.to(device).eval()
    n = sizes.beam_images
    features = torch.randn(n, sizes.locations, sizes.feature_dim, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(n, sizes.locations, dtype=torch.bool, device=device)
    K, max_len = sizes.beam_size, sizes.beam_max_len
    search, options = ModelSearch(model), DecodeOptions(beam_size=K, max_len=max_len)
    run = lambda f, m: best_captions(search.annotations(f, m, options))  # noqa: E731

    run(features[:2], mask[:2])  # warm-up
    m = min(n, sequential_images or n)
    t_batched = t_seq = float("inf")
    for _ in range(max(1, reps)):
        with _counting_rows(model.decoder) as rows:  # the batched run's decoder rows (a counter, no sync)
            t, batched = clock(lambda: run(features, mask), device)
        t_batched = min(t_batched, t)
        t, singles = clock(lambda: [run(features[i:i + 1], mask[i:i + 1]) for i in range(m)], device)
        t_seq = min(t_seq, t)
    same = all(
        torch.equal(batched.tokens[i, : batched.lengths[i]], s.tokens[0, : s.lengths[0]]) for i, s in enumerate(singles)
    )
    batched_rate, seq_rate = n / t_batched, m / t_seq
    result = {
        "beam_size": K, "max_len": max_len, "vocab_size": sizes.beam_vocab_size,
        "features": f"{sizes.locations}x{sizes.feature_dim}", "dims": sizes.hidden_dim,
        "batched_images": n, "batched_s": round(t_batched, 2), "batched_captions_per_s": round(batched_rate, 2),
        "sequential_images": m, "sequential_s": round(t_seq, 2), "sequential_captions_per_s": round(seq_rate, 2),
        "speedup": round(batched_rate / seq_rate, 2), "same_captions": same, "reps": max(1, reps),
        "mean_length": round(float(batched.lengths.float().mean()), 1),
        "note": "random weights: beams rarely reach <end>, so most run the full max_len on both sides",
    }
    if matmul_gflops:
        flops = decoder_flops(cfg.decoder, sizes.locations, sizes.feature_dim, sizes.beam_vocab_size)
        per_image = flops.forward_only(n, rows[0]) / n  # W a once per image, every row's step and output
        floor_s = per_image / (matmul_gflops * 1e9)  # per image, every product at the matmul rate
        result.update({
            "batched_flop_per_image": per_image, "batched_seconds": t_batched, "sequential_seconds": t_seq,
            "batched_gflop_per_image": round(per_image / 1e9, 3),
            "batched_fraction_of_matmul": round(per_image * n / t_batched / 1e9 / matmul_gflops, 4),
            "speedup_ceiling": round((t_seq / m) / floor_s, 2),
        })
    return result


@contextlib.contextmanager
def _counting_rows(decoder: torch.nn.Module):
    """Within the block, ``decoder.step`` adds the rows (beams) of each call to the yielded [count]."""
    rows = [0]
    step = decoder.step

    def counting(prev_words, *args, **kwargs):
        rows[0] += prev_words.shape[0]
        return step(prev_words, *args, **kwargs)

    decoder.step = counting
    try:
        yield rows
    finally:
        del decoder.step  # the class's method again


# ------------------------------------------------------------------------------ data loader


def data_loader(root: str | None, workers: tuple[int, ...] = (0, 2), seconds: float = 5.0) -> dict[str, Any]:
    """The prepared store's own loader benchmark (captioning.data.datamodule.benchmark_loader), for
    each of ``workers``, about ``seconds`` each, without its progress bar."""
    from captioning.data import datamodule as store

    if root is None:
        return {"skipped": "pass --loader-root PREPARED_DIR (a folder made by captioning prepare) to time "
                           "the training loader"}
    return {"root": root, "results": store.benchmark_loader(root, list(workers), seconds=seconds, progress=False)}


def with_overrides(sizes: Sizes, **changes: Any) -> Sizes:
    return replace(sizes, **{k: v for k, v in changes.items() if v is not None})
