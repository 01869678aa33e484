"""ONNX export (captioning/export): the encoder and one decoder step as graphs, decoded by NumPy
loops under onnxruntime, against PyTorch's decoding on the synthetic test split of a small
trained model. Skips where the ``export`` extra (onnx, onnxscript, onnxruntime) is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX engine needs the export extra (onnxruntime)")
pytest.importorskip("onnxscript", reason="exporting needs the export extra (onnx, onnxscript)")

from captioning import Captioner  # noqa: E402
from captioning.data.datamodule import CaptionDataModule  # noqa: E402
from captioning.export.onnx import ExportError, export_checkpoint, export_onnx  # noqa: E402
from captioning.export.runtime import OnnxCaptioner, OnnxModelError  # noqa: E402
from conftest import TINY_YAML, make_config, own_copy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_TEST = 100


def sharpen(ckpt: Path, gain: float = 10.0) -> None:
    """Scale the decoder's image-side weights of an untrained checkpoint (as
    tests/test_beam_search.py's models), so that different images get different captions."""
    import torch

    data = torch.load(ckpt, weights_only=True)
    for key in ("model.decoder.init_h.weight", "model.decoder.init_c.weight", "model.decoder.L_z.weight"):
        data["state_dict"][key] = data["state_dict"][key] * gain
    torch.save(data, ckpt)


def exported(root: Path, ckpt: Path, data_cfg_root: Path | None = None) -> SimpleNamespace:
    folder = export_checkpoint(ckpt, root / "model", "onnx", command="captioning export --format onnx")
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    data = CaptionDataModule(captioner.config.data, captioner.vocab)
    data.prepare_data()
    paths = [Path(r.path) for r in data.load_split("test")]
    return SimpleNamespace(root=root, ckpt=ckpt, folder=folder, captioner=captioner, paths=paths,
                           onnx=OnnxCaptioner(folder))


@pytest.fixture(scope="module")
def untrained(untrained, tmp_path_factory):
    """An untrained configs/tiny.yaml model (conftest's, overridden here) with sharpened image-side
    weights, exported: seconds."""
    root = tmp_path_factory.mktemp("onnx_untrained")
    ckpt = own_copy(untrained(f"data.synthetic.num_test={NUM_TEST}", "decode.max_len=12", config=TINY_YAML).ckpt,
                    root / "run")
    sharpen(ckpt)
    return exported(root, ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny.yaml trained for 8 epochs on 256 synthetic images, exported (minutes)."""
    root = tmp_path_factory.mktemp("onnx")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--max-epochs", "8", "--out-dir", str(root / "run"), "--set", f"data.root={root / 'data'}",
           "--set", "data.synthetic.num_train=256", "--set", f"data.synthetic.num_test={NUM_TEST}",
           "--set", "train.log_every=50", "--no-progress", "--no-test"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return exported(root, root / "run" / "best.ckpt")


def assert_same_captions(model: SimpleNamespace, min_distinct: int, **kwargs) -> None:
    torch_caps = model.captioner.caption(model.paths, **kwargs)
    onnx_caps = model.onnx.caption(model.paths, **kwargs)
    assert len(onnx_caps) == len(torch_caps) == NUM_TEST
    assert len({c.text for c in torch_caps}) >= min_distinct  # a model that tells the images apart
    for t, o in zip(torch_caps, onnx_caps):
        assert o.words == t.words, o.source
        assert o.ended == t.ended
        assert o.score == pytest.approx(t.score, abs=1e-4)
        np.testing.assert_allclose(o.attention, t.attention, atol=1e-5)
        assert [a.words for a in o.alternatives] == [a.words for a in t.alternatives]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_onnx_captions_equal_pytorch_token_for_token(untrained, beam_size):
    assert_same_captions(untrained, 4, beam_size=beam_size)


@pytest.mark.slow
@pytest.mark.parametrize("beam_size", [1, 3])
def test_trained_model_onnx_captions_equal_pytorch(trained, beam_size):
    assert_same_captions(trained, 5, beam_size=beam_size)


def test_onnx_options_n_best_min_len_no_unk(untrained):
    paths = untrained.paths[:20]
    kwargs = dict(beam_size=4, n_best=3, min_len=3, no_unk=True)
    torch_caps = untrained.captioner.caption(paths, **kwargs)
    onnx_caps = untrained.onnx.caption(paths, **kwargs)
    for t, o in zip(torch_caps, onnx_caps):
        assert [o.words] + [a.words for a in o.alternatives] == [t.words] + [a.words for a in t.alternatives]
        assert len(o.words) >= 3 and "<unk>" not in o.words


def test_onnx_engine_samples_with_the_same_search(untrained):
    """Sampling runs in the ONNX engine too (the one search loop, NumPy's generator): top-k 1 is
    greedy decoding, a seed repeats its draws, n-best draws are distinct and ranked."""
    paths = untrained.paths[:12]
    greedy = [c.words for c in untrained.captioner.caption(paths, beam_size=1)]
    assert [c.words for c in untrained.onnx.caption(paths, top_k=1, temperature=3.0, seed=0)] == greedy
    a, b, c = (untrained.onnx.caption(paths, temperature=5.0, seed=s) for s in (1, 1, 2))
    assert [x.words for x in a] == [x.words for x in b] != [x.words for x in c]
    for cap in untrained.onnx.caption(paths, temperature=5.0, n_best=4, seed=0):
        drawn = [cap, *cap.alternatives]
        assert len({tuple(x.words) for x in drawn}) == len(drawn)
        assert [x.score for x in drawn] == sorted((x.score for x in drawn), reverse=True)
    with pytest.raises(ValueError, match="needs a hard-attention model"):
        untrained.onnx.caption(paths[:1], hard_mode="argmax")
    for seed in (-1, -5, 2**32, "1"):  # the PyTorch engine's range, refused alike
        with pytest.raises(ValueError, match="seed must be a whole number from 0 to 4294967295"):
            untrained.onnx.caption(paths[:1], temperature=5.0, seed=seed)


def test_onnx_engine_imports_no_torch(untrained):
    trained = untrained
    code = ("import sys\nfrom captioning.export.runtime import OnnxCaptioner\n"
            f"caps = OnnxCaptioner({str(trained.folder)!r}).caption({[str(p) for p in trained.paths[:4]]!r})\n"
            "print('|'.join(c.text for c in caps))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = [c.text for c in trained.captioner.caption(trained.paths[:4])]
    assert result.stdout.strip().split("|") == expected


@pytest.mark.parametrize("attention,mode", [("hard", "argmax"), ("hard", "expected")])
def test_hard_attention_graphs_match_the_decoder_step(tmp_path, attention, mode):
    import torch

    from captioning.models import ShowAttendTell

    torch.manual_seed(0)
    cfg = make_config(model__attention=attention)
    model = ShowAttendTell(cfg.model, 14).eval()
    export_onnx(model, 32, tmp_path, mode)
    import onnxruntime as ort

    enc = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    step = ort.InferenceSession(str(tmp_path / "step.onnx"))
    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's
    features, keys, h, c = enc.run(None, {"images": images.numpy()})
    with torch.no_grad():
        f, m = model.encode(images)
        k = model.decoder.project(f)
        out = model.decoder.step(torch.full((5,), 1), model.decoder.init_state(f, m), f, k, m, mode=mode)
    log_p, h1, c1, alpha = step.run(None, {"words": np.ones(5, np.int64), "h": h, "c": c, "features": features,
                                           "keys": keys})
    np.testing.assert_allclose(log_p, out.logits.log_softmax(-1).numpy(), atol=1e-4)
    np.testing.assert_allclose(alpha, out.attended.alpha.numpy(), atol=1e-5)
    np.testing.assert_allclose(h1, out.state.h.numpy(), atol=1e-5)


def test_sampled_hard_attention_is_refused(tmp_path):
    from captioning.models import ShowAttendTell

    model = ShowAttendTell(make_config(model__attention="hard").model, 14).eval()
    with pytest.raises(ExportError, match="cannot be exported"):
        export_onnx(model, 32, tmp_path, "sample")


def test_folder_without_graphs_is_a_one_line_error(tmp_path):
    with pytest.raises(OnnxModelError, match="holds no ONNX graphs") as err:
        OnnxCaptioner(tmp_path)
    assert "\n" not in str(err.value)


def test_cli_export_and_caption_with_the_onnx_engine_without_torch(untrained, tmp_path, capsys):
    from captioning import cli

    out = tmp_path / "exported"
    assert cli.main(["export", "--checkpoint", str(untrained.ckpt), "--out", str(out), "--format", "onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    paths = [str(p) for p in untrained.paths[:3]]
    code = ("import sys, json\nfrom captioning.cli import main\n"
            f"rc = main(['caption', '--engine', 'onnx', '--model', {str(out)!r}, '--json', '--beam-size', '3', "
            f"'--n-best', '2', *{paths!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = untrained.captioner.caption(paths, beam_size=3, n_best=2)
    assert [r["words"] for r in rows] == [c.words for c in expected]
    assert [[a["words"] for a in r["alternatives"]] for r in rows] == [[a.words for a in c.alternatives]
                                                                      for c in expected]
    assert rows[0]["settings"]["engine"] == "onnx"


def test_cli_onnx_engine_errors(untrained, tmp_path, capsys):
    from captioning import cli

    assert cli.main(["caption", "--engine", "onnx", "--model", str(tmp_path), str(untrained.paths[0])]) == 2
    assert "holds no ONNX graphs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["caption", "--engine", "onnx", "--checkpoint", str(untrained.ckpt), str(untrained.paths[0])])
    assert "--engine onnx needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["caption", "--engine", "onnx", "--model", str(untrained.folder), "--device", "cuda",
                  str(untrained.paths[0])])
    assert "--device places PyTorch's model: it needs --engine torch" in capsys.readouterr().err


def _reordered(words: list) -> list:
    return words[:4] + [words[5], words[4]] + words[6:]


@pytest.mark.parametrize("name,change,message", [
    ("vocab.json", _reordered, "is not the vocabulary this model was saved with"),
    ("vocab.json", lambda words: words[:-3], "is not the vocabulary this model was saved with"),
    ("onnx.json", lambda meta: {k: v for k, v in meta.items() if k != "image_size"}, "lacks 'image_size'"),
    ("onnx.json", lambda meta: [], "is not a mapping"),
    ("onnx.json", lambda meta: {**meta, "encoder": "../encoder.onnx"}, "must name a file in the folder"),
    ("onnx.json", lambda meta: {**meta, "image_size": 64}, "describes soft attention at 64 pixels"),
    ("config.json", lambda meta: {**meta, "config": {k: v for k, v in meta["config"].items() if k != "model"}},
     "the section 'model' is missing"),
    ("config.json", lambda meta: {**meta, "config": {**meta["config"], "decode": {"beam_size": -2}}},
     "'decode.beam_size' must be positive"),
])
def test_the_onnx_engine_checks_a_folder_as_the_torch_engine_does(untrained, tmp_path, capsys, name, change, message):
    """A reordered vocab.json captioned with wrong words, exit 0; a damaged onnx.json or config.json
    gave a traceback."""
    import shutil

    from captioning import cli

    folder = Path(shutil.copytree(untrained.folder, tmp_path / "m"))
    (folder / name).write_text(json.dumps(change(json.loads((folder / name).read_text()))))
    with pytest.raises(OnnxModelError, match=message) as err:
        OnnxCaptioner(folder)
    assert "\n" not in str(err.value)
    assert cli.main(["caption", "--engine", "onnx", "--model", str(folder), str(untrained.paths[0])]) == 2
    out, err_text = capsys.readouterr()
    assert out == "" and err_text.count("\n") == 1 and message in err_text


@pytest.mark.parametrize("option,value", [("--repeats", "0"), ("--threads", "-1"), ("--batch-size", "0"),
                                          ("--limit", "0"), ("--limit", "-1"), ("--beam-size", "0")])
def test_speed_refuses_counts_below_one(tmp_path, capsys, option, value):
    from captioning.export import speed

    with pytest.raises(SystemExit) as exit:
        speed.main(["--checkpoint", str(tmp_path / "best.ckpt"), "--model", str(tmp_path), option, value])
    assert exit.value.code == 2
    assert f"argument {option}: expected a positive integer" in capsys.readouterr().err
