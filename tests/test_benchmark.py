"""Performance tooling: the analytic FLOP count, the benchmark command, and the GPU code paths
that can run on a CPU (torch.compile, bf16 autocast). Speed itself is never asserted here."""

from __future__ import annotations

import json
import os
import shlex
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_config, random_captions
from captioning import fast
from captioning.console import CommandFailed, InvalidValue
from captioning.losses import caption_loss
from captioning.models import ShowAttendTell
from captioning.perf.compile import compile_model, compile_unsupported_reason
from captioning.perf.flops import decoder_flops, training_step_flops
from captioning.training.module import CaptioningModule
from captioning.models.decoder import DecoderState
from captioning.vocab import SPECIALS, Vocabulary

from captioning.perf import run as benchmark  # captioning benchmark (scripts/benchmark.py)

pytestmark = pytest.mark.usefixtures("seed", "one_thread")

V = 30


def grids(model: ShowAttendTell, images: int, seed: int = 0) -> torch.Tensor:
    """Random annotation grids [images, L, D] of the tiny model's shape (4x4 grid, 128 channels)."""
    L = model.encoder.grid_size**2
    return torch.randn(images, L, model.encoder.out_channels, generator=torch.Generator().manual_seed(seed))


def loss_of(model: ShowAttendTell, inputs: torch.Tensor, captions: torch.Tensor, mode: str, fused: bool = True):
    """The training step's loss, as CaptioningModule computes it: on the fused pass of
    captioning/fast.py, or (``fused`` False) on the model's own reference loop."""
    out = (fast.FusedTrainingPass(model) if fused else model)(inputs, captions, mode=mode)
    return caption_loss(make_config().loss, out, captions[:, 1:], terms=model.mechanism.loss_terms,
                        baseline=torch.zeros(())).loss


# ============================================================================ FLOP count


@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "expected"), ("hard", "sample")])
@pytest.mark.parametrize("score, gate", [("additive", "scalar"), ("dot", "vector"), ("bilinear", "none")])
@pytest.mark.parametrize("k", [1, 2])
def test_the_fused_pass_runs_exactly_the_useful_flops(attention, mode, score, gate, k):
    """The analytic useful count equals what torch.utils.flop_counter sees in a real training
    forward + backward on the fused pass (k captions share each image)."""
    cfg = make_config(model__attention=attention, model__decoder__score=score, model__decoder__gate=gate)
    model = ShowAttendTell(cfg.model, V)
    features = grids(model, 3)
    captions = random_captions(3 * k, V, min_len=2, max_len=6)
    tokens = (captions[:, 1:] != Vocabulary.pad_id).sum(1).tolist()
    with FlopCounterMode(display=False) as counter:
        loss_of(model, features, captions, mode).backward()
    L, D = features.shape[1:]
    flops = decoder_flops(cfg.model.decoder, L, D, V, mode)
    assert counter.get_total_flops() == training_step_flops(flops, tokens, k)


def test_fine_tuned_features_double_the_image_side_backward():
    cfg = make_config()
    model = ShowAttendTell(cfg.model, V)
    features = grids(model, 2).requires_grad_()  # as if the encoder were trained
    captions = random_captions(2, V)
    tokens = (captions[:, 1:] != Vocabulary.pad_id).sum(1).tolist()
    with FlopCounterMode(display=False) as counter:
        loss_of(model, features, captions, "expected").backward()
    flops = decoder_flops(cfg.model.decoder, 16, 128, V, features_need_grad=True)
    assert counter.get_total_flops() == training_step_flops(flops, tokens)


def test_useful_flops_count_images_once_and_real_tokens_only():
    flops = decoder_flops(make_config().model.decoder, 16, 128, V)
    useful = training_step_flops(flops, [3, 5, 2, 6], captions_per_image=2)  # 2 images, 16 real tokens
    assert useful == pytest.approx(flops.training(images=2, steps=16))
    assert flops.projection_training > 0
    assert useful < flops.training(images=2, steps=4 * 6)  # every caption for every padded step
    with pytest.raises(ValueError, match="multiple of captions_per_image"):
        training_step_flops(flops, [3, 5, 2], captions_per_image=2)


def test_coco_sizes_flops_per_caption():
    """The numbers the README quotes: at COCO sizes the image projection is ~40% of the useful
    work of a 15-token caption (so recomputing it per step would cost ~15x that)."""
    from captioning.perf.benchmark import COCO, coco_model_config

    cfg = coco_model_config(COCO, "soft")
    flops = decoder_flops(cfg.decoder, 196, 2048, 9490)
    per_caption = flops.training(images=1, steps=15)
    projection = 2 * 196 * 2048 * 512
    assert flops.per_image == pytest.approx(projection + 4 * 2048 * 512 + 2 * 196 * 2048)
    assert 1.9e9 < per_caption < 2.1e9
    assert 0.35 < 2 * projection / per_caption < 0.45


# ============================================================================ the benchmark command


def test_quick_benchmark_writes_json_and_tables(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.run(["--quick", "--out", str(out), "--sections", "train", "beam", "loader",
                              "--batches", "4", "--attention", "soft", "hard"])
    saved = json.loads(out.read_text())
    assert saved["machine"]["device"] == "cpu" and saved["sizes"]["beam_images"] == 6
    assert saved["matmul"]["fp32"]["best_gflops"] > 0  # added: train needs the yardstick
    rows = {r["attention"].split()[0]: r for r in saved["train"]}
    assert set(rows) == {"soft", "hard"}
    for r in rows.values():
        assert r["batch_captions"] == 4 and r["step_ms"] > 0 and r["captions_per_s"] > 0
        assert r["step_ms"] >= r["forward_ms"] + r["backward_ms"] - 1e-6
        assert 0 < r["useful_flop_per_step"] <= r["executed_flop_per_step"]
        assert r["best_step_s"] <= r["step_s"]
        achieved = r["useful_flop_per_step"] / r["best_step_s"] / 1e9
        assert r["fraction_of_matmul"] == pytest.approx(achieved / saved["matmul"]["fp32"]["best_gflops"], abs=1e-4)
    beam = saved["beam"]
    assert beam["same_captions"] is True  # batched and one-at-a-time decode the same captions
    assert beam["batched_images"] == beam["sequential_images"] == 6 and beam["speedup"] > 0
    # The ceiling: the one-at-a-time time per image over the batched FLOPs per image at the matmul rate.
    rate = saved["matmul"]["fp32"]["best_gflops"] * 1e9
    floor_s = beam["batched_flop_per_image"] / rate
    assert beam["speedup_ceiling"] == pytest.approx(beam["sequential_seconds"] / 6 / floor_s, rel=0.01)
    # Stored to 4 decimals: at a fraction of 0.002 that rounding alone is 2.5%.
    assert beam["batched_fraction_of_matmul"] == pytest.approx(6 * floor_s / beam["batched_seconds"], rel=0.01,
                                                               abs=5e-5)
    assert "skipped" in saved["loader"] and "--loader-root" in saved["loader"]["skipped"]
    printed = capsys.readouterr().out
    assert "teacher-forced training step" in printed and "speed-up" in printed and str(out) in printed
    assert results["total_seconds"] == saved["total_seconds"]


@pytest.mark.parametrize("k", [1, 2])
def test_the_benchmark_measures_the_executed_flops_of_each_path(k):
    """executed_flop_per_step is what the step ran: the useful count on the fast path, every
    caption for every padded step on the reference loop."""
    from captioning.perf.benchmark import QUICK, coco_model_config, train_step

    flops = decoder_flops(coco_model_config(QUICK, "soft").decoder, QUICK.locations, QUICK.feature_dim, QUICK.vocab_size)
    fast_row, reference = (train_step(QUICK, "soft", 4, torch.device("cpu"), 100.0, captions_per_image=k, path=path,
                                      reps=1) for path in ("fast", "reference"))
    assert fast_row["executed_flop_per_step"] == fast_row["useful_flop_per_step"]
    assert reference["useful_flop_per_step"] == fast_row["useful_flop_per_step"]
    assert reference["executed_flop_per_step"] == flops.training(4 // k, 4 * reference["padded_steps"])
    assert reference["executed_flop_per_step"] > reference["useful_flop_per_step"]


def test_counting_rows_counts_every_step_and_restores_the_method():
    from captioning.perf.benchmark import _counting_rows

    model = ShowAttendTell(make_config().model, V).eval()
    features = grids(model, 2)
    mask = torch.ones(features.shape[:2], dtype=torch.bool)
    keys = model.decoder.project(features)
    state = model.decoder.init_state(features, mask)
    words = torch.full((2,), Vocabulary.start_id)

    with _counting_rows(model.decoder) as rows, torch.no_grad():
        out = model.decoder.step(words, state, features, keys, mask)
        model.decoder.step(words.repeat(3), DecoderState(*(x.repeat(3, 1) for x in out.state)),
                           features, keys, mask)
    assert rows == [2 + 6]
    assert "step" not in vars(model.decoder)  # the class's method again


def test_quick_encoder_section(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        saved = benchmark.run(["--quick", "--out", str(tmp_path / "b.json"), "--sections", "encoder",
                                "--backbones", "resnet18"])
    assert not [str(w.message) for w in seen if "encoder" in str(w.message)]  # --quick's own sizes fit its grid
    (row,) = saved["encoder"]
    assert row["backbone"] == "resnet18" and row["grid"] == "4x4x512" and row["images_per_s"] > 0
    assert row["gflop_per_image"] > 0
    assert "matmul" not in saved  # only the sections asked for
    assert "encoder forward (random weights, frozen, the last stage pooled to 4x4)" in capsys.readouterr().out


def test_benchmark_rejects_missing_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CommandFailed, match="CUDA is not available"):
        benchmark.run(["--quick", "--device", "cuda", "--out", str(tmp_path / "b.json")])


def test_loader_hook_calls_the_store_benchmark(monkeypatch):
    """With --loader-root, the section calls captioning.data.datamodule's loader benchmark with its
    worker counts and duration, and without its progress bar."""
    from captioning.data import datamodule as store
    from captioning.perf.benchmark import data_loader

    calls = []

    def fake(root, workers, *, seconds=1.0, progress=True):
        calls.append((root, workers, seconds, progress))
        return [{"workers": w, "images_per_s": 1.0} for w in workers]

    monkeypatch.setattr(store, "benchmark_loader", fake)
    result = data_loader("prepared/x", (0, 2), seconds=3.0)
    assert calls == [("prepared/x", [0, 2], 3.0, False)]
    assert result == {"root": "prepared/x", "results": [{"workers": 0, "images_per_s": 1.0},
                                                         {"workers": 2, "images_per_s": 1.0}]}


# ============================================================================ GPU paths on the CPU


def test_compile_config_is_applied_lazily_and_keeps_parameter_names():
    cfg = make_config(train__compile="step")
    vocab = list(SPECIALS) + [f"w{i}" for i in range(V - len(SPECIALS))]
    eager = CaptioningModule.create(make_config(), Vocabulary(vocab))
    compiled = CaptioningModule.create(cfg, Vocabulary(vocab))
    decoder = compiled.model.decoder
    assert decoder.attention._compiled_call_impl is not None and decoder.lstm._compiled_call_impl is not None
    assert compiled.fused is None and eager.fused is not None  # compiled runs the reference loop
    assert eager.model.decoder.attention._compiled_call_impl is None
    assert not any(callable(v) for v in vars(decoder).values())  # no method replaced on the instance
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints stay interchangeable
    with pytest.raises(ValueError, match="unknown compile target"):
        compile_model(eager.model, "everything")


@pytest.mark.slow
@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "sample")])
def test_compiled_step_gives_the_eager_loss_and_gradients(attention, mode):
    """train.compile=step on the CPU (Inductor's C++ backend): same loss and gradients as eager."""
    reason = compile_unsupported_reason()
    if reason:
        pytest.skip(reason)
    cfg = make_config(model__attention=attention)
    eager = ShowAttendTell(cfg.model, V)
    compiled = ShowAttendTell(cfg.model, V)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, "step")  # compiled runs the reference teacher-forced loop, and so does
    # the eager one here (fused=False): sampled locations are drawn in the same order
    features, captions = grids(eager, 4), random_captions(4, V, min_len=3, max_len=6)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    losses, grads = [], []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same sampled locations in hard mode
        loss = loss_of(model, features, captions, mode, fused=False)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters()]))
    assert counters["stats"]["unique_graphs"] >= 1  # something was really compiled
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_bf16_autocast_on_cpu_trains_in_fp32_weights(attention):
    """The GPU default (bf16-mixed) on the CPU: same loss to bf16 accuracy, fp32 gradients."""
    cfg = make_config(model__attention=attention)
    model = ShowAttendTell(cfg.model, V)
    features, captions = grids(model, 4), random_captions(4, V, min_len=3, max_len=6)
    reference = loss_of(model, features, captions, "expected")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, features, captions, "expected")
        out = model(features, captions)
    assert out.logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32  # the loss is computed in fp32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=1e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.decoder.parameters())


def test_precision_auto_is_bf16_on_gpu_only(monkeypatch):
    from captioning.training.trainer import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(make_config()) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(make_config()) == "bf16-mixed"
    assert resolve_precision(make_config(train__accelerator="cpu")) == "32-true"


def test_machine_info_names_the_malloc_settings_the_process_started_with(monkeypatch):
    """The library leaves glibc's malloc alone; the benchmark records the environment variables
    that tuned it (docs/performance.md), or that there were none."""
    from captioning.perf.benchmark import machine_info

    for key in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    assert machine_info(torch.device("cpu"))["malloc"] == "glibc defaults"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "67108864")
    assert machine_info(torch.device("cpu"))["malloc"] == "MALLOC_MMAP_THRESHOLD_=67108864, MALLOC_TRIM_THRESHOLD_=1073741824"


# ============================================================================ side by side


PORT_MODELS = '''
import torch
from torch import nn


class DecoderWithAttention(nn.Module):
    """A stand-in with the port's interface: (encoder_out [B, s, s, D], captions, lengths [B, 1]) ->
    (scores [B, T, V], sorted captions, decode lengths, alphas [B, T, L], sort order)."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fc = nn.Linear(embed_dim + encoder_dim, vocab_size)

    def forward(self, encoder_out, encoded_captions, caption_lengths):
        B, D = encoder_out.shape[0], encoder_out.shape[-1]
        encoder_out = encoder_out.view(B, -1, D)
        caption_lengths, sort_ind = caption_lengths.squeeze(1).sort(dim=0, descending=True)
        encoder_out, encoded_captions = encoder_out[sort_ind], encoded_captions[sort_ind]
        decode_lengths = (caption_lengths - 1).tolist()
        T = max(decode_lengths)
        context = encoder_out.mean(1, keepdim=True).expand(B, T, D)
        scores = self.fc(torch.cat([self.embedding(encoded_captions[:, :T]), context], -1))
        alphas = torch.full((B, T, encoder_out.shape[1]), 1.0 / encoder_out.shape[1])
        return scores, encoded_captions, decode_lengths, alphas, sort_ind
'''


def test_paths_times_the_port_beside_ours_on_the_same_batch(tmp_path):
    """python -m captioning.perf.paths --port DIR: the port's training step (here a stand-in with its
    interface) alternates with ours and its rate is the yardstick of over_port."""
    from captioning.perf import paths

    (tmp_path / "models.py").write_text(PORT_MODELS)
    result = paths.main(["--quick", "--reps", "1", "--variants", "fast", "--port", str(tmp_path)])
    assert set(result["captions_per_s"]) == {"fast", "port"}
    assert result["over_port"]["fast"] == pytest.approx(result["captions_per_s"]["fast"] / result["captions_per_s"]["port"],
                                                        rel=0.05)
    with pytest.raises(InvalidValue, match="holds no models.py"):
        paths.main(["--quick", "--port", str(tmp_path / "missing")])


def test_benchmark_writes_into_its_own_folder_or_only_where_out_says(tmp_path, monkeypatch, capsys):
    from captioning.files import MARKER, folder_kind

    monkeypatch.chdir(tmp_path)
    benchmark.run(["--quick", "--sections", "matmul"])
    folder = tmp_path / "runs" / "benchmark"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["benchmark.json", MARKER])
    assert folder_kind(folder) == "benchmark" and "matmul" in json.loads((folder / "benchmark.json").read_text())
    benchmark.run(["--quick", "--sections", "matmul"])  # its own folder: written again
    assert not (tmp_path / "runs" / "benchmark.json").exists()
    benchmark.run(["--quick", "--sections", "matmul", "--out", "my results/b.json"])
    assert sorted(p.name for p in (tmp_path / "my results").iterdir()) == ["b.json"]  # no marker, nothing else
    recorded = json.loads((tmp_path / "my results" / "b.json").read_text())["command"]
    assert shlex.split(recorded)[2:] == ["--quick", "--sections", "matmul", "--out", "my results/b.json"]  # runs again

    foreign = tmp_path / "other"
    (foreign / "runs" / "benchmark").mkdir(parents=True)
    (foreign / "runs" / "benchmark" / "notes.txt").write_text("mine")
    monkeypatch.chdir(foreign)
    capsys.readouterr()
    with pytest.raises(CommandFailed) as exc:
        benchmark.run(["--quick", "--sections", "matmul"])
    assert "is not empty and was not written by show-attend-tell" in str(exc.value) and "--out FILE" in str(exc.value)
    assert sorted(p.name for p in (foreign / "runs" / "benchmark").iterdir()) == ["notes.txt"]
    assert benchmark.main(["--quick", "--sections", "matmul", "--out", "runs"]) == 1
    assert "error: --out runs is a folder: name the JSON file to write" in capsys.readouterr().err
