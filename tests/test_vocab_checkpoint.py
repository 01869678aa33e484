"""Tokenisation and the vocabulary; checkpoints that rebuild a model from the file alone."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_config, random_captions, random_images, greedy_decode
from captioning.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from captioning.config import to_dict
from captioning.training.module import CaptioningModule
from captioning.vocab import SPECIALS, Vocabulary, tokenize

pytestmark = pytest.mark.usefixtures("seed", "one_thread")


# ============================================================================ tokenize / vocabulary


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red CIRCLE, left of the square!") == ["a", "red", "circle", "left", "of", "the", "square"]
    assert tokenize("  two  dogs... 3 cats?! ") == ["two", "dogs", "3", "cats"]
    assert tokenize("The dog's ball.") == ["the", "dog's", "ball"]
    assert tokenize("") == [] and tokenize("?!.,;") == []


def test_build_respects_min_count_and_specials():
    captions = ["a red circle", "a blue circle", "A red square.", "a triangle"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words[:4] == list(SPECIALS)
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.index[s] for s in SPECIALS] == [0, 1, 2, 3]
    # counts: a 4, circle 2, red 2; blue/square/triangle 1 -> dropped. Most frequent first.
    assert vocab.words[4:] == ["a", "circle", "red"]
    everything = Vocabulary.build(captions, min_count=1)
    assert set(everything.words[4:]) == {"a", "red", "blue", "circle", "square", "triangle"}
    assert everything.words[4] == "a"
    assert len(Vocabulary.build(captions, min_count=100)) == 4


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["a red circle left of a blue square"], min_count=1)
    ids = vocab.encode("A red circle, left of a blue square.", max_len=20)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert len(ids) == 8 + 2
    assert vocab.decode(ids) == "a red circle left of a blue square".split()
    assert vocab.decode(torch.tensor(ids)) == "a red circle left of a blue square".split()


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary(list(SPECIALS) + ["a", "b", "c"])
    assert vocab.decode([1, 4, 0, 5, 2, 6, 6]) == ["a", "b"]
    assert vocab.decode([4, 5, 6, 0, 0]) == ["a", "b", "c"]
    assert vocab.decode([2, 4]) == []
    assert vocab.decode([4, 3, 5]) == ["a", "<unk>", "b"]


def test_encode_truncates_at_max_len():
    vocab = Vocabulary.build(["one two three four five"], min_count=1)
    ids = vocab.encode("one two three four five", max_len=3)
    assert len(ids) == 5
    assert vocab.decode(ids) == ["one", "two", "three"]
    assert ids[-1] == vocab.end_id
    assert vocab.encode("one", max_len=0) == [vocab.start_id, vocab.end_id]


def test_unknown_words_map_to_unk():
    vocab = Vocabulary.build(["a red circle"], min_count=1)
    ids = vocab.encode("a purple circle", max_len=10)
    assert ids == [1, vocab.index["a"], vocab.unk_id, vocab.index["circle"], 2]


@pytest.mark.parametrize(
    "words",
    [
        ["a", "b"],
        ["<start>", "<pad>", "<end>", "<unk>", "a"],
        list(SPECIALS[:3]) + ["a"],
        list(SPECIALS) + ["a", "b", "a"],
        list(SPECIALS) + ["<pad>"],
        list(SPECIALS) + [7],
        {"words": list(SPECIALS)},
        None,
    ],
)
def test_vocabulary_rejects_bad_word_lists(words):
    with pytest.raises(ValueError):
        Vocabulary(words)


def test_vocabulary_equality():
    words = list(SPECIALS) + ["a", "b"]
    assert Vocabulary(words) == Vocabulary(list(words))
    assert Vocabulary(words) != Vocabulary(list(SPECIALS) + ["b", "a"])
    assert len(Vocabulary(words)) == 6


# ============================================================================ checkpoints


def save_module(module: CaptioningModule, path) -> None:
    """What Lightning writes, reduced to the two entries our loader reads."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "epoch": 3, "global_step": 10}, path)


@pytest.fixture
def soft_module(tiny_vocab):
    return CaptioningModule.create(make_config(), tiny_vocab)


def test_checkpoint_loads_with_weights_only(tmp_path, soft_module, tiny_vocab):
    path = tmp_path / "best.ckpt"
    save_module(soft_module, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["vocab"] == tiny_vocab.words
    assert ckpt["hyper_parameters"]["config"] == to_dict(make_config())
    assert all(k.startswith("model.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_load_checkpoint_rebuilds_the_same_model(tmp_path, tiny_vocab, attention):
    cfg = make_config(model__attention=attention, model__decoder__score="bilinear", model__decoder__gate="vector")
    module = CaptioningModule.create(cfg, tiny_vocab)
    # Move BN statistics and weights away from their initial values, so a fresh model differs.
    module.train()
    with torch.no_grad():
        module.model.encoder(random_images(4) * 2 + 0.5)
        for p in module.model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "last.ckpt"
    save_module(module, path)

    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    assert loaded.vocab == tiny_vocab
    assert not loaded.model.training
    original = module.model.eval()
    images, captions = random_images(2, seed=5), random_captions(2, len(tiny_vocab), seed=5)
    with torch.no_grad():
        a = original(images, captions)
        b = loaded.model(images, captions)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.alphas, a.alphas, rtol=0, atol=0)
    da = greedy_decode(original, images, max_len=5)
    db = greedy_decode(loaded.model, images, max_len=5)
    assert torch.equal(da.tokens, db.tokens)


def test_load_checkpoint_never_fetches_encoder_weights(tmp_path, tiny_vocab):
    # A model trained from "imagenet" weights: the checkpoint holds them, nothing is downloaded.
    module = CaptioningModule.create(make_config(), tiny_vocab)
    hp = dict(module.hparams)
    hp["config"] = {**hp["config"], "model": {**hp["config"]["model"],
                                              "encoder": {**hp["config"]["model"]["encoder"], "weights": "imagenet"}}}
    path = tmp_path / "imagenet.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp}, path)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded.model.encoder.stages.stem[0].weight,
                               module.model.encoder.stages.stem[0].weight, rtol=0, atol=0)


def test_hard_module_state_dict_holds_the_baseline(tmp_path, tiny_vocab):
    module = CaptioningModule.create(make_config(model__attention="hard"), tiny_vocab)
    assert "baseline.value" in module.state_dict()
    module.baseline.update(torch.tensor(2.0))
    path = tmp_path / "hard.ckpt"
    save_module(module, path)
    ckpt = read_checkpoint(path)
    assert ckpt["state_dict"]["baseline.value"].item() == pytest.approx(0.2)
    load_checkpoint(path)  # the extra non-"model." key does not disturb loading
    soft = CaptioningModule.create(make_config(), tiny_vocab)
    assert not any(k.startswith("baseline") for k in soft.state_dict())


def _one_line_checkpoint_error(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message, message
    assert message
    return err.value


def test_missing_checkpoint(tmp_path):
    err = _one_line_checkpoint_error(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(err)


def test_directory_is_not_a_checkpoint(tmp_path):
    _one_line_checkpoint_error(tmp_path)


# Text that torch's weights-only unpickler reads as opcodes: 'h' (BINGET of a missing memo entry)
# raises KeyError, 't' ... IndexError; every one of them must still become a CheckpointError.
@pytest.mark.parametrize("text", ["model:\n  attention: soft\n", "The quick brown fox\n", "garbage", "",
                                  "hello world\n", "this is not a checkpoint\n", "a,b,c\n1,2,3\n"])
def test_text_file_is_not_a_checkpoint(tmp_path, text):
    path = tmp_path / "notes.txt"
    path.write_text(text)
    _one_line_checkpoint_error(path)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    # Short files too: 1-3 random bytes trip the unpickler with IndexError, KeyError, struct.error.
    for seed_ in range(120):
        rng = random.Random(seed_)
        n = rng.choice([1, 2, 3, 5, 10, 100, 1000])
        path = tmp_path / f"random{seed_}.ckpt"
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        _one_line_checkpoint_error(path)


def test_corrupt_zip_is_not_a_checkpoint(tmp_path, soft_module):
    path = tmp_path / "good.ckpt"
    save_module(soft_module, path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    _one_line_checkpoint_error(truncated)


def test_torch_file_without_hyper_parameters(tmp_path, soft_module):
    path = tmp_path / "weights_only.ckpt"
    torch.save({"state_dict": soft_module.state_dict()}, path)
    err = _one_line_checkpoint_error(path)
    assert "not a show-attend-tell checkpoint" in str(err)
    path2 = tmp_path / "plain_state_dict.pt"
    torch.save(soft_module.model.state_dict(), path2)
    _one_line_checkpoint_error(path2)
    path3 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path3)
    _one_line_checkpoint_error(path3)


def test_checkpoint_with_unknown_config_key(tmp_path, soft_module):
    hp = dict(soft_module.hparams)
    config = to_dict(make_config())
    config["model"]["decoder"]["layer_norm"] = True  # a key from some other version
    hp["config"] = config
    path = tmp_path / "future.ckpt"
    torch.save({"state_dict": soft_module.state_dict(), "hyper_parameters": hp}, path)
    err = _one_line_checkpoint_error(path)
    assert "model.decoder.layer_norm" in str(err)


def test_checkpoint_with_bad_vocab_or_mismatched_weights(tmp_path, soft_module, tiny_vocab):
    hp = dict(soft_module.hparams)
    path = tmp_path / "badvocab.ckpt"
    torch.save({"state_dict": soft_module.state_dict(), "hyper_parameters": {**hp, "vocab": ["a", "b"]}}, path)
    _one_line_checkpoint_error(path)
    # The config says hidden_dim 64 but the weights are for 32.
    config = to_dict(make_config(model__decoder__hidden_dim=64))
    path = tmp_path / "mismatch.ckpt"
    torch.save({"state_dict": soft_module.state_dict(), "hyper_parameters": {**hp, "config": config}}, path)
    _one_line_checkpoint_error(path)
