"""Inference: the Captioner API, the caption CLI (captioning.cli / scripts/caption.py) and
scripts/evaluate.py, on a tiny untrained checkpoint built in-process (no training run)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captioning import Captioner
from captioning.caption import run as caption_script  # captioning caption (scripts/caption.py)
from captioning import cli
from captioning.checkpoint import CheckpointError
from captioning.data.datamodule import EvalDataset
from captioning.data.transforms import ImageLoadError
from captioning.evaluation import run as evaluate_script  # captioning evaluate (scripts/evaluate.py)
from captioning.search import DecodeOptions
from captioning.visualization import figure_size
from conftest import HARD

REPO = Path(__file__).resolve().parents[1]

MAX_LEN = 5  # the untrained checkpoints' decode.max_len (conftest.UNTRAINED)


@pytest.fixture(scope="module")
def tiny(untrained):
    """Soft and hard attention (argmax)."""
    soft, hard = untrained(), untrained(*HARD)
    assert soft.cfg.decode.max_len == MAX_LEN
    return SimpleNamespace(cfg=soft.cfg, ckpt=soft.ckpt, hard_ckpt=hard.ckpt, data=soft.data,
                           test_paths=soft.test_paths)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images in awkward formats (all must caption) and broken files (each one error line)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    good = {}

    def add(name: str, img: Image.Image, **save) -> None:
        good[name] = folder / name
        img.save(good[name], **save)

    add("gray.png", noise.convert("L"))
    add("cmyk.jpg", noise.convert("CMYK"))
    rgba = noise.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    add("rgba.png", rgba)
    add("palette.png", noise.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    add("deep16.png", Image.fromarray((rng.integers(0, 65536, (40, 30))).astype(np.uint16)))
    wide = Image.new("RGB", (48, 24), (200, 30, 30))
    wide.paste((20, 20, 220), (0, 0, 24, 24))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    add("rotated.jpg", wide, exif=exif.tobytes())
    add("tiny.png", Image.new("RGB", (1, 1), (10, 200, 10)))
    assert Image.open(good["cmyk.jpg"]).mode == "CMYK"
    assert Image.open(good["palette.png"]).mode == "P"
    assert Image.open(good["deep16.png"]).mode in ("I;16", "I")

    bad = {"text.jpg": folder / "text.jpg", "truncated.jpg": folder / "truncated.jpg",
           "empty.png": folder / "empty.png"}
    bad["text.jpg"].write_text("this is not an image\n")
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    bad["truncated.jpg"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    bad["empty.png"].write_bytes(b"")
    return SimpleNamespace(folder=folder, good=list(good.values()), bad=list(bad.values()), by_name={**good, **bad})


def run_cli(capsys, *args) -> tuple[int, list[str], list[str]]:
    rc = cli.main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def error_lines(err: list[str]) -> list[str]:
    return [line for line in err if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_prints_one_tab_separated_line_per_image(tiny, capsys):
    paths = tiny.test_paths[:3]
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, *paths)
    assert rc == 0, err
    assert error_lines(err) == []
    assert len(out) == len(paths)
    for line, path in zip(out, paths):
        assert line.count("\t") == 1
        shown, text = line.split("\t")
        assert shown == str(path)
        assert 1 <= len(text.split()) <= MAX_LEN


def test_json_lines_and_one_heatmap_per_image(tiny, capsys, tmp_path):
    # Two files with the same stem in different folders still get two figures.
    other = tmp_path / "other"
    other.mkdir()
    twin = other / tiny.test_paths[0].name
    twin.write_bytes(tiny.test_paths[0].read_bytes())
    paths = tiny.test_paths[:2] + [twin]
    heatmaps = tmp_path / "heatmaps"
    rc = caption_script.main(["--checkpoint", str(tiny.ckpt), *map(str, paths), "--json", "--heatmaps", str(heatmaps)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row in rows:
        assert set(row) == {"path", "caption", "score", "words", "cut", "settings", "training_data"}
        assert row["training_data"]["dataset"] == "synthetic" and row["cut"] is (len(row["words"]) == MAX_LEN)
        assert row["caption"] == " ".join(row["words"])
        assert row["score"] < 0
        assert row["settings"] == {"method": "beam", "beam_size": 3, "length_penalty": 0.0, "max_len": MAX_LEN,
                                   "hard_mode": None, "attention": "soft", "n_best": 1, "temperature": None,
                                   "top_k": None, "min_len": 0, "no_unk": False}  # the checkpoint's decode.beam_size
    figures = sorted(heatmaps.glob("*.png"))
    assert len(figures) == len(paths)
    assert {f.stem for f in figures} == {paths[0].stem, paths[1].stem, paths[0].stem + "_2"}
    for row, path in zip(rows, [heatmaps / f"{paths[0].stem}.png", heatmaps / f"{paths[1].stem}.png",
                                heatmaps / f"{paths[0].stem}_2.png"]):
        with Image.open(path) as fig:
            assert fig.format == "PNG"
            assert fig.size == figure_size(len(row["words"]))


def test_folders_and_globs_are_expanded(tiny, capsys, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, src in enumerate(tiny.test_paths[:3]):
        (folder / f"img{2 - i}.jpg").write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    shots = tmp_path / "shots"
    shots.mkdir()
    for i, src in enumerate(tiny.test_paths[3:5]):
        (shots / f"shot{i}.JPG").write_bytes(src.read_bytes())
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, folder, str(shots / "*.JPG"),
                           str(tmp_path / "missing.jpg"), str(tmp_path / "nothing*.png"))
    assert rc == 1  # the two inputs that match nothing
    shown = [line.split("\t")[0] for line in out]
    assert shown == [str(folder / f"img{i}.jpg") for i in range(3)] + [str(shots / f"shot{i}.JPG") for i in range(2)]
    errors = error_lines(err)
    assert len(errors) == 2
    assert "missing.jpg" in errors[0] and "nothing*.png" in errors[1]


def test_bad_files_are_reported_and_the_others_captioned(tiny, images, capsys):
    inputs = [images.by_name[n] for n in ("gray.png", "text.jpg", "cmyk.jpg", "truncated.jpg", "rgba.png",
                                          "empty.png", "palette.png", "deep16.png", "rotated.jpg", "tiny.png")]
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, *inputs, "--batch-size", "4")
    assert rc == 1
    assert [line.split("\t")[0] for line in out] == [str(p) for p in inputs if p in images.good]
    errors = error_lines(err)
    assert len(errors) == len(images.bad)
    for path, line in zip(images.bad, errors):
        assert line.startswith(f"error: {path}: ")
        assert len(line.split(": ", 2)[2]) > 0  # a reason
    # Each bad file is named by exactly one stderr line; nothing is a traceback.
    for path in images.bad:
        assert sum(path.name in line for line in err) == 1
    assert not any("Traceback" in line for line in err)


def test_exif_orientation_and_modes_are_converted(tiny, images):
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    rotated = captioner.open(images.by_name["rotated.jpg"])
    assert rotated.size == (24, 48) and rotated.mode == "RGB"
    assert rotated.getpixel((12, 6))[2] > 150  # the blue square moved to the top after rotation
    for path in images.good:
        tensor = captioner.preprocess(path)
        assert tensor.shape == (3, tiny.cfg.data.image_size, tiny.cfg.data.image_size)
        assert torch.isfinite(tensor).all()
    for path in images.bad:
        with pytest.raises(ImageLoadError):
            captioner.caption(path)


def test_a_file_that_is_no_image_is_named_in_words(tiny, images, capsys):
    path = images.by_name["text.jpg"]
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, path)
    assert rc == 1 and out == []
    assert error_lines(err) == [f"error: {path}: not an image file Pillow can read"]


def test_float_images_are_rescaled_as_deep_ones_not_black(tmp_path):
    from captioning.data.transforms import load_image

    values = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    rgb = np.asarray(load_image(tmp_path / "float.tif"), dtype=np.float64)
    assert rgb.shape == (40, 50, 3)
    np.testing.assert_allclose(rgb[..., 1], values * (255 / values.max()), atol=1)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid, tiny (~100 bytes) 1-bit PNG whose header declares width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def extreme(tmp_path_factory):
    """A 10000x10000 JPEG (100 MP: above Pillow's 89 MP warning, below its 179 MP refusal), a
    decompression bomb (a 100-byte PNG claiming 100000x100000 pixels) and a 1x1 image."""
    folder = tmp_path_factory.mktemp("extreme")
    big = Image.new("L", (10000, 10000), 200)  # grayscale: 100 MB to build instead of 300 MB
    big.paste(40, (1000, 1000, 4000, 9000))  # a dark bar on the left
    big.save(folder / "huge.jpg", quality=85)
    del big
    Image.new("RGB", (1, 1), (10, 200, 10)).save(folder / "one_pixel.png")
    return SimpleNamespace(huge=folder / "huge.jpg", bomb=png_claiming(folder / "bomb.png", 100_000, 100_000),
                           one_pixel=folder / "one_pixel.png")


def test_bomb_is_refused_while_huge_and_one_pixel_images_are_captioned(tiny, extreme, capsys):
    inputs = [extreme.bomb, extreme.huge, extreme.one_pixel, tiny.test_paths[0]]
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, *inputs)
    assert rc == 1  # one input failed
    assert [line.split("\t")[0] for line in out] == [str(p) for p in inputs[1:]]
    assert all(len(line.split("\t")[1].split()) >= 1 for line in out)
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {extreme.bomb}: ")
    assert "decompression bomb" in errors[0] and "MAX_IMAGE_PIXELS" in errors[0]
    assert not any("Traceback" in line for line in err)


def test_huge_jpeg_is_decoded_at_reduced_scale_by_the_one_loader(tiny, extreme):
    from captioning.data.datamodule import ImageSource
    from captioning.data.transforms import DRAFT_SIZE, load_image

    img = load_image(extreme.huge)
    assert img.mode == "RGB" and img.size == (1250, 1250)  # libjpeg's 1/8 scale, both sides >= DRAFT_SIZE
    assert min(img.size) >= DRAFT_SIZE
    assert img.getpixel((300, 600))[0] < 80 and img.getpixel((1000, 600))[0] > 160  # the bar is on the left
    # Training's loader and the API give the same tensor for it, and for the 1x1 image.
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    for path in (extreme.huge, extreme.one_pixel):
        source = ImageSource([SimpleNamespace(path=str(path))], tiny.cfg.data.image_size, cache=False)
        assert torch.equal(captioner.preprocess(path), source[0])
    with pytest.raises(ImageLoadError) as err:
        load_image(extreme.bomb)
    assert str(extreme.bomb) in str(err.value) and "\n" not in str(err.value)


def test_missing_checkpoint_exits_2_with_one_line(tiny, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "--checkpoint", tmp_path / "nope.ckpt", tiny.test_paths[0])
    assert rc == 2 and out == []
    assert len(err) == 1 and err[0].startswith("error:") and "nope.ckpt" in err[0]


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b"hello", b"", "dict"])
def test_not_a_checkpoint_exits_2(tiny, capsys, tmp_path, content):
    fake = tmp_path / "fake.ckpt"
    if content == "dict":
        torch.save({"state_dict": {}}, fake)
    else:
        fake.write_bytes(content)
    rc, out, err = run_cli(capsys, "--checkpoint", fake, tiny.test_paths[0])
    assert rc == 2 and out == []
    assert len(err) == 1 and err[0].startswith("error:") and "fake.ckpt" in err[0]
    with pytest.raises(CheckpointError):
        Captioner.from_checkpoint(fake, device="cpu")


def test_no_images_at_all_exits_2(tiny, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, empty)
    assert rc == 2 and out == []
    assert error_lines(err)[-1].startswith("error: no images")
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt)
    assert rc == 2 and len(err) == 1


def test_from_split_captions_the_first_images_of_the_split(tiny, capsys):
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, "--from-split", "test", "--limit", "4")
    assert rc == 0, err
    assert [line.split("\t")[0] for line in out] == [str(p) for p in tiny.test_paths[:4]]


def test_progress_lines_for_several_batches(tiny, capsys):
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, *tiny.test_paths[:5], "--batch-size", "2")
    assert rc == 0 and len(out) == 5
    progress = [line for line in err if line.startswith("caption:")]
    assert len(progress) == 3 and "5/5 images" in progress[-1] and "images/s" in progress[-1]


def test_script_exit_status_in_a_real_process(tiny, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "caption.py"), "--checkpoint",
                           str(tmp_path / "missing.ckpt"), str(tiny.test_paths[0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert cli.main(["nonsense"]) == 2


# ------------------------------------------------------------------------------------------ API


def test_api_returns_the_same_captions_as_the_cli(tiny, capsys):
    paths = tiny.test_paths
    rc = cli.main(["caption", "--checkpoint", str(tiny.ckpt), "--json", *map(str, paths)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    assert not captioner.model.training
    assert captioner.settings == rows[0]["settings"]
    captions = captioner.caption(paths, batch_size=3)  # different batching, same results
    assert [c.text for c in captions] == [r["caption"] for r in rows]
    assert [c.source for c in captions] == [str(p) for p in paths]
    assert [c.score for c in captions] == pytest.approx([r["score"] for r in rows], abs=1e-4)
    g = tiny.cfg.model.encoder.grid_size
    for cap in captions:
        assert cap.text == " ".join(cap.words)
        assert cap.attention.shape == (len(cap.words), g, g)
        np.testing.assert_allclose(cap.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)  # soft alphas
    # PIL images and single inputs work too.
    with Image.open(paths[0]) as img:
        [from_pil] = captioner.caption(img)
    assert from_pil.source == "<PIL image>" and from_pil.text == captions[0].text
    assert len(captioner.caption(paths[0], max_len=2)[0].words) <= 2
    with pytest.raises(ValueError):
        captioner.caption(paths[0], hard_mode="argmax")  # soft attention has no hard mode


def test_sampled_captions_of_the_cli_are_the_api_s_batch_by_batch(tiny, capsys, tmp_path):
    """A seed gives each batch its own draws (seed + batch number), in the CLI as in the API: one
    image three times in batches of one is not captioned three times alike."""
    paths = []
    for name in "abc":
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(tiny.test_paths[0].read_bytes())
    sampling = ["--temperature", "5", "--seed", "0", "--batch-size", "1"]
    rc, out, err = run_cli(capsys, "--checkpoint", tiny.ckpt, *paths, *sampling)
    assert rc == 0, err
    cli_captions = [line.split("\t")[1] for line in out]
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    api_captions = [c.text for c in captioner.caption(paths, temperature=5.0, seed=0, batch_size=1)]
    assert cli_captions == api_captions
    assert len(set(api_captions)) > 1


@pytest.mark.parametrize("seed", ["-1", "-5", "4294967296", "99999999999999999999", "1.5"])
def test_cli_seed_outside_what_both_engines_take_is_refused(tiny, capsys, seed):
    with pytest.raises(SystemExit) as exit:
        run_cli(capsys, "--checkpoint", tiny.ckpt, tiny.test_paths[0], "--temperature", "2", "--seed", seed)
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    assert "argument --seed: expected a whole number from 0 to 4294967295" in err.splitlines()[-1]


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20, 1.5, "1", True])
def test_api_seed_outside_what_both_engines_take_is_a_one_line_error(tiny, seed):
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to 4294967295") as err:
        captioner.caption(tiny.test_paths[0], temperature=2.0, seed=seed)
    assert "\n" not in str(err.value)
    images = torch.stack([captioner.preprocess(tiny.test_paths[0])])
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to 4294967295"):
        captioner.caption_tensors(images, None, captioner.options(temperature=2.0), seed=seed)


def test_the_largest_seed_samples_every_batch(tiny):
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    captions = captioner.caption(tiny.test_paths[:3], temperature=2.0, seed=2**32 - 1, batch_size=1)
    assert len(captions) == 3


def test_hard_attention_uses_the_checkpoint_hard_mode(tiny):
    captioner = Captioner.from_checkpoint(tiny.hard_ckpt, device="cpu")
    assert captioner.settings == {"method": "beam", "beam_size": 3, "length_penalty": 0.0, "max_len": MAX_LEN,
                                  "hard_mode": "argmax", "attention": "hard", "n_best": 1, "temperature": None,
                                  "top_k": None, "min_len": 0, "no_unk": False}
    assert captioner.options(beam_size=1).method == "greedy"
    assert captioner.options(hard_mode="expected").hard_mode == "expected"
    assert captioner.record(captioner.options(DecodeOptions(beam_size=1)))["hard_mode"] == "argmax"
    g = tiny.cfg.model.encoder.grid_size
    for mode in (None, "expected", "sample"):
        [cap] = captioner.caption(tiny.test_paths[0], hard_mode=mode)
        assert cap.attention.shape == (len(cap.words), g, g)


def test_api_preprocessing_is_the_training_preprocessing(tiny, monkeypatch):
    """What the API feeds the model equals the training dataset's tensors for the same files."""
    records = tiny.data.load_split("test")
    dataset = EvalDataset(records, tiny.data.images("test"))
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    fed = []
    encode = captioner.model.encode

    def spy(images, image_mask=None):
        fed.append(images.detach().clone())
        return encode(images, image_mask)

    monkeypatch.setattr(captioner.model, "encode", spy)
    captioner.caption([r.path for r in records], batch_size=len(records))
    assert len(fed) == 1
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.equal(fed[0], expected)
    for i, record in enumerate(records):
        assert torch.equal(captioner.preprocess(record.path), dataset[i][0])


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_writes_predictions_and_metrics(tiny, capsys, tmp_path):
    out_dir = tmp_path / "eval"
    results = evaluate_script.run(["--checkpoint", str(tiny.ckpt), "--split", "test", "--metrics", "bleu",
                                    "--out-dir", str(out_dir), "--batch-size", "3"])
    out, err = capsys.readouterr()
    split_ids = sorted(r.image_id for r in tiny.data.load_split("test"))
    predictions = json.loads((out_dir / "predictions_test.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == split_ids
    assert all(set(p) == {"image_id", "caption"} for p in predictions)
    metrics = json.loads((out_dir / "metrics_test.json").read_text())
    assert metrics["num_images"] == len(split_ids) == results["num_images"]
    assert metrics["split"] == "test" and metrics["scale"] == "0-100"  # evaluate.py reports x100; train.py 0-1
    assert metrics["decode"]["method"] == "beam" and metrics["decode"]["beam_size"] == 3
    assert metrics["checkpoint"] == str(tiny.ckpt)
    assert {"bleu_1", "bleu_4", "caption_accuracy"} <= set(metrics["metrics"])
    assert "meteor" not in metrics["metrics"] and "meteor" not in metrics["skipped"]
    assert f"images scored: {len(split_ids)}" in out and "BLEU-4" in out
    assert any("images/s" in line for line in err.splitlines())
    # The predictions are the captions the API gives for the same images.
    captioner = Captioner.from_checkpoint(tiny.ckpt, device="cpu")
    texts = [c.text for c in captioner.caption([r.path for r in tiny.data.load_split("test")])]
    assert [p["caption"] for p in sorted(predictions, key=lambda p: p["image_id"])] == texts


def test_evaluate_missing_checkpoint_exits_2(capsys, tmp_path):
    assert evaluate_script.main(["--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.ckpt" in err[0]
