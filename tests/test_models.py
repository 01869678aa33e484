"""Encoder, attention, decoder, losses and greedy decoding: shape contracts and behaviour.

Everything runs on random weights (model.encoder.weights="none") with tiny images: no downloads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from conftest import make_captions, make_config, random_captions, random_images, greedy_decode
from captioning.config import ConfigError, EncoderConfig, LossConfig, validate
from captioning import fast
from captioning.decoding import ModelSearch, best_captions
from captioning.search import DecodeOptions
from captioning.losses import (
    ReinforceBaseline,
    attention_entropy,
    caption_loss,
    caption_nll,
    doubly_stochastic_penalty,
    per_token_nll,
)
from captioning.models import ShowAttendTell
from captioning.models.attention import AdditiveScore, HardAttention, NoAttention, SoftAttention, build_score, masked_softmax
from captioning.models.decoder import Decoder, DecoderOutput
from captioning.models.encoder import Encoder, EncoderWeightsError
from captioning.vocab import Vocabulary

pytestmark = pytest.mark.usefixtures("seed", "one_thread")

V = 14  # len(tiny_vocab)


def build_model(**dotted) -> ShowAttendTell:
    cfg = make_config(**dotted)
    return ShowAttendTell(cfg.model, V)


def teacher_forced(model: ShowAttendTell, images: torch.Tensor, captions: torch.Tensor, *, fused: bool,
                   logits: bool = True, **kwargs) -> DecoderOutput:
    """The model's own reference loop, or (``fused``) the fused pass of captioning/fast.py, as the
    training module runs it. ``logits`` False: the per-token NLL instead of the logits."""
    if fused:
        x = model.teacher_forcing(images, captions, sample_mask=kwargs.pop("sample_mask", None))
        return fast.teacher_forced(model.decoder, captions, features=x.features, mask=x.mask, keys=x.keys,
                                   rows=x.rows, sample_mask=x.sample_mask, logits=logits, **kwargs)
    out = model(images, captions, **kwargs)
    if logits:
        return out
    return out._replace(logits=None, token_nll=per_token_nll(out.logits, captions[:, 1:], Vocabulary.pad_id))


# ============================================================================ encoder


@pytest.mark.parametrize(
    "backbone, D",
    [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048), ("resnet152", 2048),
     ("vgg16", 512), ("vgg19", 512)],
)
def test_encoder_default_stage_shapes(backbone, D):
    vgg = backbone.startswith("vgg")
    enc = Encoder(EncoderConfig(backbone=backbone, stage=None, grid_size=4, weights="none",
                                fine_tune_from=None if vgg else "stem"))
    assert enc.out_channels == D
    enc.eval()
    images = random_images(1, 64)
    with torch.no_grad():
        features, mask = enc(images)
        fmap = enc.stages(images)
    assert features.shape == (1, 16, D)
    assert mask.shape == (1, 16) and mask.dtype == torch.bool and bool(mask.all())
    if vgg:
        # conv5 (conv5_3 / conv5_4) before its max-pool: stride 16, so 64x64 -> 4x4 ...
        assert fmap.shape == (1, 512, 4, 4)
        assert not isinstance(list(enc.stages.conv5)[-1], nn.MaxPool2d)
        # ... and the 4x4 grid needs no pooling: the annotations are the feature map itself.
        torch.testing.assert_close(features, fmap.flatten(2).transpose(1, 2))
    else:
        assert fmap.shape == (1, D, 2, 2)  # ResNet layer4: stride 32


@pytest.mark.parametrize(
    "backbone, stage, D",
    [("resnet18", "stem", 64), ("resnet18", "layer1", 64), ("resnet18", "layer2", 128),
     ("resnet18", "layer3", 256), ("resnet50", "layer2", 512), ("vgg16", "conv3", 256)],
)
def test_encoder_stage_channels(backbone, stage, D):
    fine = None if backbone.startswith("vgg") else "stem"
    enc = Encoder(EncoderConfig(backbone=backbone, stage=stage, grid_size=3, weights="none", fine_tune_from=fine))
    assert enc.out_channels == D
    assert [name for name, _ in enc.stages.named_children()][-1] == stage
    enc.eval()
    with torch.no_grad():
        features, _ = enc(random_images(2, 32))
    assert features.shape == (2, 9, D)


def test_fine_tune_from_freezes_earlier_stages_only():
    enc = Encoder(EncoderConfig(backbone="resnet18", stage="layer3", grid_size=2, fine_tune_from="layer2"))
    frozen = {"stem", "layer1"}
    for name, stage in enc.stages.named_children():
        flags = {p.requires_grad for p in stage.parameters()}
        assert flags == ({False} if name in frozen else {True}), name
    enc.train()
    for name, stage in enc.stages.named_children():
        for module in stage.modules():
            assert module.training == (name not in frozen), name


def test_fine_tune_from_none_freezes_everything():
    enc = Encoder(EncoderConfig(backbone="resnet18", stage="layer2", grid_size=2, fine_tune_from=None))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training
    assert not any(m.training for stage in enc.stages for m in stage.modules())


def test_frozen_batchnorm_statistics_do_not_move_in_train_mode():
    model = build_model(model__encoder__stage="layer2", model__encoder__fine_tune_from="layer2")
    model.train()  # through the parent module, as Lightning does
    enc = model.encoder
    frozen_bn = enc.stages.stem[1]
    trainable_bn = enc.stages.layer2[0].bn1
    assert isinstance(frozen_bn, nn.BatchNorm2d) and isinstance(trainable_bn, nn.BatchNorm2d)
    before_frozen = (frozen_bn.running_mean.clone(), frozen_bn.running_var.clone(), int(frozen_bn.num_batches_tracked))
    before_train = trainable_bn.running_mean.clone()
    with torch.no_grad():
        enc(random_images(2, 32) * 3 + 1)
    assert torch.equal(frozen_bn.running_mean, before_frozen[0])
    assert torch.equal(frozen_bn.running_var, before_frozen[1])
    assert int(frozen_bn.num_batches_tracked) == before_frozen[2]
    assert not torch.equal(trainable_bn.running_mean, before_train)  # the control: this one moves


def test_unknown_backbone_and_stage_are_named():
    with pytest.raises(ValueError, match="resnet9000"):
        Encoder(EncoderConfig(backbone="resnet9000"))
    with pytest.raises(ValueError, match="layer7"):
        Encoder(EncoderConfig(backbone="resnet18", stage="layer7"))
    with pytest.raises(ValueError, match="layer4"):  # fine-tuning from a stage that was cut off
        Encoder(EncoderConfig(backbone="resnet18", stage="layer2", fine_tune_from="layer4"))


def test_missing_weights_file_raises_encoder_weights_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(EncoderWeightsError, match="nope.pth"):
        Encoder(EncoderConfig(backbone="resnet18", weights=str(missing)))


def test_corrupt_weights_file_raises_encoder_weights_error(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    with pytest.raises(EncoderWeightsError):
        Encoder(EncoderConfig(backbone="resnet18", weights=str(bad)))
    text = tmp_path / "weights.txt"
    text.write_text("not a state dict\n")
    with pytest.raises(EncoderWeightsError):
        Encoder(EncoderConfig(backbone="resnet18", weights=str(text)))


def test_weights_of_another_depth_raise_encoder_weights_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(EncoderWeightsError, match="resnet34"):  # resnet34 has more blocks: missing keys
        Encoder(EncoderConfig(backbone="resnet34", weights=str(path)))


def test_weights_with_mismatched_shapes_raise_encoder_weights_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(EncoderWeightsError):
        Encoder(EncoderConfig(backbone="resnet50", weights=str(path)))


def test_weights_file_holding_a_tensor_raises_encoder_weights_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(EncoderWeightsError):
        Encoder(EncoderConfig(backbone="resnet18", weights=str(path)))


@pytest.mark.parametrize("wrapped", [False, True])
def test_state_dict_file_loads_and_matches_torchvision(tmp_path, wrapped):
    torch.manual_seed(123)
    net = torchvision.models.resnet18()
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = net.state_dict()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state} if wrapped else state, path)

    enc = Encoder(EncoderConfig(backbone="resnet18", stage="layer2", grid_size=4, weights=str(path)))
    torch.testing.assert_close(enc.stages.stem[0].weight, net.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(enc.stages.layer2[1].bn2.running_var, net.layer2[1].bn2.running_var, rtol=0, atol=0)
    enc.eval()
    net.eval()
    images = random_images(2, 32)
    with torch.no_grad():
        features, _ = enc(images)
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        expected = net.layer2(net.layer1(x))  # [2, 128, 4, 4]: the grid needs no pooling
    torch.testing.assert_close(features, expected.flatten(2).transpose(1, 2))


def test_image_mask_marks_padded_cells():
    enc = Encoder(EncoderConfig(backbone="resnet18", stage="layer2", grid_size=4, fine_tune_from=None))
    enc.eval()
    images = random_images(3, 32)
    image_mask = torch.ones(3, 32, 32, dtype=torch.bool)
    image_mask[0, :, 16:] = False  # right half is padding
    image_mask[1, :, 24:] = False  # right quarter is padding
    image_mask[2] = False  # all padding: never left with nothing to attend to
    with torch.no_grad():
        _, mask = enc(images, image_mask)
    grid = mask.view(3, 4, 4)
    assert grid[0, :, :2].all() and not grid[0, :, 2:].any()
    assert grid[1, :, :3].all() and not grid[1, :, 3:].any()
    assert mask.sum(1).min() >= 1
    assert grid[2].all()
    with torch.no_grad():
        _, no_mask = enc(images)
    assert no_mask.all()


# ============================================================================ attention


def _attention_inputs(B=3, L=6, D=5, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, L, D, generator=gen)
    h = torch.randn(B, n, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    mask[1, 3] = False
    return features, h, mask


SCORES = ["additive", "dot", "scaled_dot", "bilinear"]


@pytest.mark.parametrize("score", SCORES)
def test_soft_attention_alpha_is_a_masked_distribution(score):
    features, h, mask = _attention_inputs()
    att = SoftAttention(build_score(score, 5, 4, 7))
    keys = att.project(features)
    out = att(features, keys, mask, h)
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3))
    assert (out.alpha[~mask] == 0.0).all()
    assert (out.alpha[mask] > 0).all()
    torch.testing.assert_close(out.context, torch.einsum("bl,bld->bd", out.alpha, features))
    assert out.log_prob is None and out.location is None


def test_additive_score_gives_the_papers_alphas():
    """The additive score is the paper's f_att: alpha = softmax(v^T tanh(W a + U h) + b)."""
    features, h, mask = _attention_inputs()
    att = SoftAttention(build_score("additive", 5, 4, 7))
    score = att.score
    paper = score.v(torch.tanh(score.W(features) + score.U(h)[:, None, :])).squeeze(-1)
    expected = paper.masked_fill(~mask, float("-inf")).softmax(-1)
    out = att(features, att.project(features), mask, h)
    torch.testing.assert_close(out.alpha, expected)
    (out.context.sum() + out.alpha.square().sum()).backward()
    assert all(p.grad is not None for p in att.parameters())


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("mechanism, mode", [(SoftAttention, "expected"), (HardAttention, "argmax")])
def test_grouped_attention_equals_repeated_annotations(score, mechanism, mode):
    """g rows of h per image (beam search's beams) attending over ONE copy of each image's
    annotations give what repeating the annotations g times gives."""
    features, _, mask = _attention_inputs()
    g = 4
    h = torch.randn(3 * g, 4)
    att = mechanism(build_score(score, 5, 4, 7))
    with torch.no_grad():
        keys = att.project(features)
        grouped = att(features, keys, mask, h, mode=mode)
        rep = lambda x: x.repeat_interleave(g, dim=0)  # noqa: E731
        repeated = att(rep(features), rep(keys), rep(mask), h, mode=mode)
    torch.testing.assert_close(grouped.alpha, repeated.alpha)
    torch.testing.assert_close(grouped.context, repeated.context)
    assert (grouped.alpha[~rep(mask)] == 0).all()
    with pytest.raises(ValueError, match="same number per image"):
        att(features, keys, mask, h[:-1], mode=mode)


@pytest.mark.parametrize("score", SCORES)
def test_hard_attention_sample_mode(score):
    features, h, mask = _attention_inputs()
    att = HardAttention(build_score(score, 5, 4, 7))
    keys = att.project(features)
    for _ in range(30):
        out = att(features, keys, mask, h, mode="sample")
        torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3))
        assert (out.alpha[~mask] == 0.0).all()
        rows = torch.arange(3)
        assert mask[rows, out.location].all(), "sampled a padded location"
        assert torch.isfinite(out.log_prob).all()
        torch.testing.assert_close(out.log_prob, out.alpha[rows, out.location].log())
        torch.testing.assert_close(out.context, features[rows, out.location])


def test_hard_attention_argmax_and_expected_modes():
    features, h, mask = _attention_inputs()
    att = HardAttention(build_score("additive", 5, 4, 7))
    keys = att.project(features)
    out = att(features, keys, mask, h, mode="argmax")
    assert torch.equal(out.location, out.alpha.argmax(-1))
    torch.testing.assert_close(out.context, features[torch.arange(3), out.location])
    exp = att(features, keys, mask, h, mode="expected")
    torch.testing.assert_close(exp.context, (exp.alpha[:, :, None] * features).sum(1))
    torch.testing.assert_close(exp.alpha, out.alpha)
    with pytest.raises(ValueError, match="bogus"):
        att(features, keys, mask, h, mode="bogus")


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_soft_attention_refuses_non_expected_modes(mode):
    features, h, mask = _attention_inputs()
    att = SoftAttention(build_score("additive", 5, 4, 7))
    with pytest.raises(ValueError, match=mode):
        att(features, att.project(features), mask, h, mode=mode)


def test_hard_attention_sample_mask_substitutes_expected_context():
    features, h, mask = _attention_inputs()
    att = HardAttention(build_score("additive", 5, 4, 7))
    keys = att.project(features)
    sample_mask = torch.tensor([True, False, True])
    out = att(features, keys, mask, h, mode="sample", sample_mask=sample_mask)
    expected = (out.alpha[:, :, None] * features).sum(1)
    torch.testing.assert_close(out.context[1], expected[1])
    assert out.location[1] == -1 and out.log_prob[1] == 0.0
    for i in (0, 2):
        loc = out.location[i]
        assert loc >= 0 and mask[i, loc]
        torch.testing.assert_close(out.context[i], features[i, loc])
        torch.testing.assert_close(out.log_prob[i], out.alpha[i, loc].log())


# ============================================================================ decoder / captioner


@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "sample"), ("hard", "expected"),
                                             ("hard", "argmax")])
def test_teacher_forced_shapes(attention, mode):
    model = build_model(model__attention=attention)
    B, k = 2, 3
    captions = random_captions(B * k, V, min_len=2, max_len=5)
    out = model(random_images(B), captions, mode=mode)
    T = captions.shape[1] - 1
    L = 16
    assert out.logits.shape == (B * k, T, V)
    assert out.alphas.shape == (B * k, T, L)
    assert out.mask.shape == (B * k, L)
    if mode in ("sample", "argmax"):  # a location was chosen at every step
        assert out.log_probs is not None and out.log_probs.shape == (B * k, T)
        assert torch.isfinite(out.log_probs).all() and (out.log_probs <= 0).all()
    else:
        assert out.log_probs is None


def test_captions_must_be_a_multiple_of_images():
    model = build_model()
    with pytest.raises(ValueError):
        model(random_images(2), random_captions(3, V))


def test_k_captions_per_image_equal_repeated_images():
    model = build_model().eval()
    B, k = 2, 3
    images = random_images(B)
    captions = random_captions(B * k, V, min_len=1, max_len=6)
    with torch.no_grad():
        shared = model(images, captions)
        repeated = model(images.repeat_interleave(k, dim=0), captions)
    torch.testing.assert_close(shared.logits, repeated.logits)
    torch.testing.assert_close(shared.alphas, repeated.alphas)


def test_hard_sample_mask_per_image_is_repeated_for_its_captions():
    model = build_model(model__attention="hard").eval()
    B, k = 2, 2
    captions = random_captions(B * k, V)
    real = captions[:, 1:] != Vocabulary.pad_id
    for fused in (False, True):
        out = teacher_forced(model, random_images(B), captions, fused=fused, mode="sample",
                             sample_mask=torch.tensor([True, False]))
        assert (out.log_probs[:2][real[:2]] < 0).all()  # image 0's captions sample at every real step
        assert (out.log_probs[2:] == 0).all()  # image 1's captions use the expected context
    assert (out.log_probs[~real] == 0).all()  # the fused pass does not run padded steps


@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "expected"), ("hard", "argmax")])
@pytest.mark.parametrize("score, gate", [("additive", "scalar"), ("dot", "vector"), ("scaled_dot", "none"),
                                         ("bilinear", "scalar")])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("longest_first", [False, True])
def test_fast_teacher_forcing_equals_the_reference_loop(attention, mode, score, gate, k, longest_first):
    """fast.teacher_forced (live rows longest first, hoisted and fused products, weight gradients
    taken once over all steps) gives the reference step-by-step loop's logits, attention, loss and
    every parameter's gradient, on the real tokens: for a batch in any order, and for one that
    comes longest first as collate_train makes it for k = 1 (then it is used without reordering)."""
    cfg = make_config(model__attention=attention, model__decoder__score=score, model__decoder__gate=gate)
    model = ShowAttendTell(cfg.model, V).eval()  # no dropout: both passes see the same network
    features = torch.randn(3, 16, model.encoder.out_channels)
    captions = random_captions(3 * k, V, min_len=1, max_len=6)
    lengths = (captions[:, 1:] != Vocabulary.pad_id).sum(1)
    captions = captions[lengths.argsort(descending=longest_first, stable=True)]
    if not longest_first:  # shortest first: the fast path has to reorder this batch
        assert (lengths.sort().values.diff() > 0).any()
    real = captions[:, 1:] != Vocabulary.pad_id
    results = []
    for fused in (False, True):
        model.zero_grad()
        out = teacher_forced(model, features, captions, fused=fused, mode=mode)
        loss = caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms,
                            baseline=torch.zeros(())).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), out.logits[real].detach(), out.alphas[real].detach(), grads))
    (loss_a, logits_a, alphas_a, grads_a), (loss_b, logits_b, alphas_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(logits_b, logits_a)
    torch.testing.assert_close(alphas_b, alphas_a)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)

    # Training's form: token NLL instead of logits (output layer and loss on the real tokens only).
    model.zero_grad()
    out = teacher_forced(model, features, captions, fused=True, logits=False, mode=mode)
    assert out.logits is None and out.token_nll.shape == captions[:, 1:].shape
    assert (out.token_nll[~real] == 0).all()
    nll = torch.nn.functional.cross_entropy(logits_a.float(), captions[:, 1:][real], reduction="none")
    torch.testing.assert_close(out.token_nll[real].detach(), nll)
    caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms,
                 baseline=torch.zeros(())).loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def assert_fast_equals_reference(model: ShowAttendTell, loss_of_model) -> torch.Tensor:
    """``loss_of_model(fused)`` with the reference teacher-forced loop, then with the fused pass: the
    same loss and the same gradient for every parameter. Returns the fused pass's loss."""
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss = loss_of_model(fused)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    return loss_b


@pytest.mark.parametrize("k", [1, 2])
def test_fast_training_pass_draws_the_reference_loops_dropout_masks(k):
    """With dropout on, the fused pass's packed output layer (token NLL) draws the masks
    the reference loop draws for its padded [B, T, m] batch, so training takes the same path whichever
    runs: same loss and gradients under the same seed."""
    cfg = make_config(model__decoder__dropout=0.5)
    torch.manual_seed(0)
    model = ShowAttendTell(cfg.model, V).train()
    features = torch.randn(3, 16, model.encoder.out_channels)
    captions = random_captions(3 * k, V, min_len=1, max_len=6)

    def loss(seed: int, fused: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        out = teacher_forced(model, features, captions, fused=fused, logits=False)
        return caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms).loss

    fast_loss = assert_fast_equals_reference(model, lambda fused: loss(1, fused))
    assert abs(float(loss(2, True).detach()) - float(fast_loss)) > 1e-3  # another draw, another loss: dropout is on


def test_training_batches_of_one_caption_per_image_come_longest_first():
    """collate_train orders a batch with one caption per image longest caption first (stable),
    keeping each image's pixels, caption and id together: the order the fast path uses as it is.
    With several captions per image it keeps the batch's order."""
    from captioning.data.datamodule import collate_train

    def items(lengths):
        return [(torch.full((3, 2, 2), float(i)), [[1] + [5] * n + [2] for n in caps], 10 + i)
                for i, caps in enumerate(lengths)]

    def real_tokens(batch):
        return (batch["captions"][:, 1:] != Vocabulary.pad_id).sum(1).tolist()  # words + <end>

    batch = collate_train(items([[4], [6], [2], [6]]))
    assert batch["image_ids"].tolist() == [11, 13, 10, 12]  # 6, 6 (stable), 4, 2
    assert batch["images"][:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0, 2.0]
    assert real_tokens(batch) == [7, 7, 5, 3]
    batch = collate_train(items([[2, 4], [6, 1], [4, 3]]))
    assert batch["image_ids"].tolist() == [10, 11, 12]
    assert real_tokens(batch) == [3, 5, 7, 2, 5, 4]


@pytest.mark.parametrize("scale", [1.0, 300.0])
@pytest.mark.parametrize("chunk", [2**20, 1])
def test_fast_additive_score_equals_autograd(scale, chunk, monkeypatch):
    """The hand-differentiated additive score of the fast path (UnrolledAdditiveScore, through the
    sigmoid) gives the reference loop's loss and gradients, with small keys and with keys far in
    tanh's saturation (scale 300), its map computed for all images at once and one image at a
    time (chunk 1)."""
    monkeypatch.setattr("captioning.fast.SCORE_CHUNK_ELEMENTS", chunk)
    cfg = make_config(model__decoder__score="additive")
    model = ShowAttendTell(cfg.model, V).eval()
    with torch.no_grad():
        model.decoder.attention.score.W.weight.mul_(scale)
    features = torch.randn(3, 16, model.encoder.out_channels)
    captions = random_captions(3, V, min_len=1, max_len=6)
    real = captions[:, 1:] != Vocabulary.pad_id

    def loss(fused: bool) -> torch.Tensor:
        out = teacher_forced(model, features, captions, fused=fused)
        return caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)[0].sum() + out.alphas[real].square().sum()

    assert_fast_equals_reference(model, loss)


def test_fast_path_backward_twice_with_retain_graph():
    """The fast path's additive score keeps each step's z intact in backward, so a retained graph gives the
    same gradients twice."""
    model = build_model()
    captions = random_captions(3, V, min_len=2, max_len=6)
    out = teacher_forced(model, torch.randn(3, 16, model.encoder.out_channels), captions, fused=True)
    loss = caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)[0].sum()
    params = list(model.decoder.attention.parameters())
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_fast_inference_scores_give_the_papers_alphas(scale):
    """Decoding's additive scores (fast.inference_scores: the exponential form, or beyond
    EXP_FORM_BOUND the sigmoid) give the paper's alphas, g rows per image; the cached e^k follows
    an in-place change of the keys; inference-mode tensors (Lightning's validation) work too."""
    score = build_score("additive", 5, 4, 7)
    with torch.no_grad():
        score.W.weight.mul_(scale)
    features, _, mask = _attention_inputs()
    h = torch.randn(3 * 2, 4)
    with torch.no_grad():
        keys = score.project(features)
        assert (float(2 * keys.abs().max()) > fast.EXP_FORM_BOUND) == (scale > 1)
        for _ in range(2):  # the second call reads the cache
            torch.testing.assert_close(masked_softmax(fast.inference_scores(score, keys, h), mask),
                                       masked_softmax(score(keys, h), mask))
        keys.mul_(0.5)  # the cached e^k of these keys is stale now
        torch.testing.assert_close(masked_softmax(fast.inference_scores(score, keys, h), mask),
                                   masked_softmax(score(keys, h), mask))
    with torch.inference_mode():
        frozen = score.project(features)
        torch.testing.assert_close(masked_softmax(fast.inference_scores(score, frozen, h), mask),
                                   masked_softmax(score(frozen, h), mask))


def test_greedy_decoding_is_the_same_with_and_without_the_fast_scores():
    model = build_model().eval()
    features = torch.randn(3, 16, model.encoder.out_channels)
    mask = torch.ones(3, 16, dtype=torch.bool)
    runs = []
    for fast_scores in (False, True):
        search = ModelSearch(model, fast=fast_scores)
        assert (search.fast_step is not None) == fast_scores
        runs.append(best_captions(search.annotations(features, mask, DecodeOptions(max_len=6))))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].alphas, runs[1].alphas)


def test_additive_scores_under_bf16_autocast_give_the_fp32_alphas():
    """bf16-mixed validation and decoding: the paper's additive score in bf16 gives fp32's alphas
    to bf16 accuracy."""
    score = build_score("additive", 5, 4, 7)
    features, h, mask = _attention_inputs()
    with torch.no_grad():
        reference = score(score.project(features), h)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = score(score.project(features), h)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float().softmax(-1), reference.softmax(-1), rtol=0.05, atol=0.02)


class _FlatScore(AdditiveScore):
    """A user's score: the additive module with its forward replaced (every location scores 0)."""

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h.new_zeros(h.shape[0], keys.shape[1]) + 0.0 * self.U(h).sum()


def test_a_subclass_overriding_forward_trains_with_its_own_forward(caplog):
    """The fast path runs only for modules it knows exactly: where training and a search are built
    for a model whose score subclasses AdditiveScore and overrides forward, the choice says so in
    one log line each and the model trains on its own loop with its own forward -- here uniform
    alphas -- not on the additive maths it inherits."""
    model = build_model().train()
    decoder = model.decoder
    decoder.attention.score = _FlatScore(model.encoder.out_channels, 32, 7)
    assert not fast.supports(decoder)
    with caplog.at_level("WARNING", logger="captioning.fast"):
        assert fast.training_pass(model) is None and fast.training_pass(model) is None
        assert ModelSearch(model).fast_step is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("_FlatScore" in line for line in lines), lines
    assert "reference loop" in lines[0] and "decoder.attention.score (_FlatScore)" in lines[0]
    captions = random_captions(3, V, min_len=2, max_len=6)
    real = captions[:, 1:] != Vocabulary.pad_id
    out = model(torch.randn(3, 16, model.encoder.out_channels), captions)
    torch.testing.assert_close(out.alphas[real], torch.full_like(out.alphas[real], 1 / 16))
    caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)[0].sum().backward()
    assert decoder.attention.score.U.weight.grad is not None


def test_fast_path_supports_exactly_the_modules_it_knows():
    assert fast.supports(build_model().decoder)
    assert fast.supports(build_model(model__attention="hard", model__decoder__score="bilinear").decoder)
    assert not fast.supports(build_model(model__attention="none").decoder)

    class MyDecoder(Decoder):
        pass

    class MyAttention(SoftAttention):
        pass

    decoder = build_model().decoder
    decoder.__class__ = MyDecoder
    assert not fast.supports(decoder)
    decoder = build_model().decoder
    decoder.attention = MyAttention(decoder.attention.score)
    assert not fast.supports(decoder)


def test_state_dict_keys_are_stable():
    """Checkpoints keep loading: the default model's decoder keys, as they have always been."""
    keys = [k for k in build_model().state_dict() if k.startswith("decoder.")]
    assert keys == [
        "decoder.embedding.weight", "decoder.init_h.weight", "decoder.init_h.bias", "decoder.init_c.weight",
        "decoder.init_c.bias", "decoder.attention.score.W.weight", "decoder.attention.score.W.bias",
        "decoder.attention.score.U.weight", "decoder.attention.score.v.weight", "decoder.attention.score.v.bias",
        "decoder.gate.weight", "decoder.gate.bias", "decoder.lstm.weight_ih", "decoder.lstm.weight_hh",
        "decoder.lstm.bias_ih", "decoder.lstm.bias_hh", "decoder.L_h.weight", "decoder.L_h.bias",
        "decoder.L_z.weight", "decoder.L_z.bias", "decoder.L_o.weight", "decoder.L_o.bias",
    ]


# ---------------------------------------------------------------------------- no attention (control)


def test_no_attention_is_the_mean_annotation_with_uniform_alphas():
    features, h, mask = _attention_inputs()
    att = NoAttention()
    g = 2
    out = att(features, att.project(features), mask, torch.randn(3 * g, 4))
    expected_alpha = (mask / mask.sum(1, keepdim=True)).repeat_interleave(g, 0)
    torch.testing.assert_close(out.alpha, expected_alpha)
    assert (out.alpha[~mask.repeat_interleave(g, 0)] == 0).all()
    mean = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.context, mean.repeat_interleave(g, 0))
    assert out.log_prob is None and out.location is None
    with pytest.raises(ValueError, match="sample"):
        att(features, att.project(features), mask, h, mode="sample")


def test_no_attention_model_has_no_f_att_and_trains_and_decodes():
    model = build_model(model__attention="none")
    assert not any(".attention." in k for k in model.state_dict())  # no score parameters at all
    assert model.decoder.gate is not None  # beta gates the mean context as for soft attention
    assert fast.training_pass(model) is None  # the fused pass does not know NoAttention
    captions = random_captions(4, V, min_len=2, max_len=6)
    features = torch.randn(2, 16, model.encoder.out_channels)
    out = teacher_forced(model, features, captions, fused=False, logits=False)
    real = captions[:, 1:] != Vocabulary.pad_id
    assert out.log_probs is None
    torch.testing.assert_close(out.alphas[real], torch.full_like(out.alphas[real], 1 / 16))
    out.token_nll.sum().backward()
    assert model.decoder.gate.weight.grad.abs().sum() > 0
    decoded = greedy_decode(model.eval(), features, torch.ones(2, 16, dtype=torch.bool), max_len=4)
    assert decoded.alphas.shape[:2] == decoded.tokens.shape


# ---------------------------------------------------------------------------- capgen options


def test_two_layer_attention_mlp_follows_capgen():
    """attention_layers=2: the keys are tanh(W_2 (W a + b) + b_2) (capgen's n_layers_att=2), the
    per-step score unchanged; the fast path gives the reference loop's loss and gradients."""
    model = build_model(model__decoder__attention_layers=2).eval()
    score = model.decoder.attention.score
    assert [k for k in model.state_dict() if "W_deep" in k] == [
        "decoder.attention.score.W_deep.0.weight", "decoder.attention.score.W_deep.0.bias"]
    features = torch.randn(3, 16, model.encoder.out_channels)
    with torch.no_grad():
        torch.testing.assert_close(score.project(features), torch.tanh(score.W_deep[0](score.W(features))))
    captions = random_captions(3, V, min_len=1, max_len=6)
    real = captions[:, 1:] != Vocabulary.pad_id

    def loss(fused: bool) -> torch.Tensor:
        out = teacher_forced(model, features, captions, fused=fused, logits=False)
        return out.token_nll.sum() + out.alphas[real].square().sum()

    assert_fast_equals_reference(model, loss)
    with pytest.raises(ValueError, match="additive"):
        build_score("dot", 5, 4, 7, layers=2)
    with pytest.raises(ConfigError, match="attention_layers"):
        validate(make_config(model__decoder__attention_layers=2, model__decoder__score="dot"))


def test_arctic_initialisation_follows_capgen():
    """init=arctic: N(0, 0.01) matrices, orthogonal where capgen's norm_weight meets a square one
    and for every recurrent block, the attention's W N(0, 0.01) even when square, zero biases."""
    torch.manual_seed(0)
    cfg = make_config(model__decoder__init="arctic", model__decoder__hidden_dim=128,
                      model__decoder__attention_dim=128, model__decoder__embed_dim=128)
    d = ShowAttendTell(cfg.model, 500).decoder  # features D = 128 = n = m = A: every matrix square
    eye = torch.eye(128)

    def orthogonal(w):
        return torch.allclose(w @ w.t(), eye, atol=1e-4)

    def small_gaussian(w):
        return abs(float(w.std()) - 0.01) < 0.002 and abs(float(w.mean())) < 0.002

    for block in d.lstm.weight_hh.chunk(4):
        assert orthogonal(block)
    for block in d.lstm.weight_ih[:, :128].chunk(4):  # W: norm_weight(dim_word, dim), square here
        assert orthogonal(block)
    assert small_gaussian(d.lstm.weight_ih[:, 128:])  # Wc: (dimctx, 4 dim), never square
    assert orthogonal(d.init_h.weight) and orthogonal(d.L_h.weight) and orthogonal(d.attention.score.U.weight)
    assert small_gaussian(d.attention.score.W.weight) and not orthogonal(d.attention.score.W.weight)
    assert small_gaussian(d.embedding.weight) and small_gaussian(d.L_o.weight)
    assert small_gaussian(d.attention.score.v.weight) and small_gaussian(d.gate.weight)
    for name, p in d.named_parameters():
        if "bias" in name:
            assert (p == 0).all(), name
    pytorch = ShowAttendTell(make_config().model, 500).decoder
    assert not (pytorch.lstm.bias_ih == 0).all()  # the default stays PyTorch's


def test_fast_path_weight_gradients_survive_bf16_autocast():
    model = build_model()
    captions = random_captions(4, V, min_len=2, max_len=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher_forced(model, torch.randn(4, 16, model.encoder.out_channels), captions, fused=True)
    assert out.logits.dtype == torch.bfloat16
    caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)[0].sum().backward()
    for p in (model.decoder.lstm.weight_ih, model.decoder.lstm.weight_hh, model.decoder.attention.score.U.weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "expected")])
def test_fast_path_under_bf16_autocast_gives_the_reference_loss_and_gradients(attention, mode):
    """bf16-mixed training (the GPU default): the fast path's token NLL and gradients are the
    reference loop's under the same autocast, to bf16 accuracy. (Not "argmax": bf16 rounds the two
    paths' scores differently, which can flip a near-tie to another location.)"""
    model = build_model(model__attention=attention).eval()
    features = torch.randn(4, 16, model.encoder.out_channels)
    captions = random_captions(4, V, min_len=2, max_len=6)
    real = captions[:, 1:] != Vocabulary.pad_id
    results = []
    for fused in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = teacher_forced(model, features, captions, fused=fused, logits=False, mode=mode)
        loss = out.token_nll.sum() + out.alphas[real].float().square().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=1e-2)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        assert grads_b[name].dtype == torch.float32
        if name.endswith("score.v.bias"):  # shifts every score alike: its gradient is 0 up to rounding
            continue
        error = float((grads_b[name] - grads_a[name]).norm() / grads_a[name].norm().clamp_min(1e-12))
        assert error < 0.25, (name, error)  # bf16 rounds at 2^-8, in other places on each path


@pytest.mark.parametrize("gate, shape", [("scalar", (1, 32)), ("vector", (128, 32)), ("none", None)])
def test_gate_variants(gate, shape):
    model = build_model(model__decoder__gate=gate)
    if shape is None:
        assert model.decoder.gate is None
    else:
        assert model.decoder.gate.weight.shape == shape
    out = model(random_images(2), random_captions(2, V))
    assert torch.isfinite(out.logits).all()


# ============================================================================ gradients


def _grads(loss, params):
    params = list(params)
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _nonzero(grads):
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_hard_sampled_nll_gives_no_gradient_to_attention_scores():
    model = build_model(model__attention="hard")
    model.train()
    captions = random_captions(4, V, min_len=3, max_len=5)
    targets = captions[:, 1:]
    out = model(random_images(4), captions, mode="sample")
    score_params = list(model.decoder.attention.score.parameters())
    assert score_params
    nll, _ = caption_nll(out.logits, targets, Vocabulary.pad_id)
    assert not _nonzero(_grads(nll.mean(), score_params))

    terms = caption_loss(LossConfig(), out, targets, terms=model.mechanism.loss_terms, baseline=torch.tensor(0.0))
    assert terms.reinforce.item() != 0.0
    assert _nonzero(_grads(terms.loss, score_params))
    # Each of REINFORCE and the entropy bonus reaches them on its own.
    assert _nonzero(_grads(terms.reinforce, score_params))
    assert _nonzero(_grads(terms.entropy, score_params))


def test_soft_nll_reaches_attention_scores():
    model = build_model(model__attention="soft")
    captions = random_captions(4, V, min_len=3, max_len=5)
    out = model(random_images(4), captions)
    nll, _ = caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)
    W = model.decoder.attention.score.W.weight
    U = model.decoder.attention.score.U.weight
    gW, gU = _grads(nll.mean(), [W, U])
    assert gW is not None and gW.abs().sum() > 0
    assert gU is not None and gU.abs().sum() > 0


def test_hard_sampled_nll_reaches_encoder_through_sampled_annotations():
    model = build_model(model__attention="hard", model__encoder__fine_tune_from="stem")
    # Cut the other path from the encoder to the NLL (h_0, c_0 from the mean annotation), so that
    # any encoder gradient must flow through the sampled annotation vectors a_{s_t}.
    with torch.no_grad():
        model.decoder.init_h.weight.zero_()
        model.decoder.init_c.weight.zero_()
    captions = random_captions(4, V, min_len=3, max_len=5)
    out = model(random_images(4), captions, mode="sample")
    nll, _ = caption_nll(out.logits, captions[:, 1:], Vocabulary.pad_id)
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    assert enc_params
    assert _nonzero(_grads(nll.mean(), enc_params))


# ============================================================================ losses


def test_doubly_stochastic_penalty_by_hand():
    # B=1, T=3 (last step is padding), L=3 (last location is padding).
    alphas = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.9, 0.1, 0.0]]])
    token_mask = torch.tensor([[True, True, False]])
    feature_mask = torch.tensor([[True, True, False]])
    # coverage over real steps: [0.7, 1.3, 0.0] -> (0.3)^2 + (-0.3)^2 on real locations = 0.18
    got = doubly_stochastic_penalty(alphas, token_mask, feature_mask)
    torch.testing.assert_close(got, torch.tensor([0.18]))
    # Every location real, all steps real: coverage [1.6, 1.4, 0.0] -> 0.36 + 0.16 + 1.0
    got = doubly_stochastic_penalty(alphas, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(got, torch.tensor([1.52]))


def test_attention_entropy_of_uniform_alpha():
    B, T, L = 2, 5, 7
    alphas = torch.full((B, T, L), 1.0 / L)
    got = attention_entropy(alphas, torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(got, torch.full((B,), T * math.log(L)))
    token_mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    got = attention_entropy(alphas, token_mask)
    torch.testing.assert_close(got, torch.tensor([3 * math.log(L), 5 * math.log(L)]))
    # A one-hot alpha has zero entropy (0 log 0 = 0, no NaN).
    one_hot = torch.zeros(1, 1, L)
    one_hot[0, 0, 2] = 1.0
    assert attention_entropy(one_hot, torch.ones(1, 1, dtype=torch.bool)).item() == 0.0


def test_reinforce_baseline_moving_average():
    base = ReinforceBaseline(0.9)
    assert base.value.item() == 0.0
    assert "value" in base.state_dict()
    expected = 0.0
    for x in (2.0, 4.0, 1.0, 3.5):
        base.update(torch.tensor(x, requires_grad=True))
        expected = 0.9 * expected + 0.1 * x
        assert base.value.item() == pytest.approx(expected, rel=1e-6)
    assert not base.value.requires_grad


def test_caption_nll_masks_padding():
    logits = torch.randn(2, 4, V)
    targets = torch.tensor([[5, 6, Vocabulary.end_id, 0], [5, Vocabulary.end_id, 0, 0]])
    nll, token_mask = caption_nll(logits, targets, Vocabulary.pad_id)
    full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(nll, torch.stack([full[0, :3].sum(), full[1, :2].sum()]))
    assert token_mask.sum().item() == 5
    # A pass's own per-token NLL (the fused pass of captioning/fast.py) is summed the same way, pads masked.
    from_tokens, _ = caption_nll(None, targets, Vocabulary.pad_id, token_nll=full + 1.0)
    torch.testing.assert_close(from_tokens, nll + token_mask.sum(1))
    with pytest.raises(ValueError, match="needs the logits or the decoder's token_nll"):
        caption_nll(None, targets, Vocabulary.pad_id)


# ============================================================================ greedy decoding


def test_greedy_decode_shapes_and_padding():
    model = build_model().eval()
    B, max_len = 3, 5
    dec = greedy_decode(model, random_images(B), max_len=max_len)
    T = dec.tokens.shape[1]
    assert dec.tokens.shape == (B, T) and T <= max_len
    assert dec.alphas.shape == (B, T, 16)
    assert dec.lengths.shape == dec.scores.shape == dec.ended.shape == (B,)
    for b in range(B):
        n = int(dec.lengths[b])
        assert (dec.tokens[b, :n] != Vocabulary.pad_id).all()
        assert (dec.tokens[b, n:] == Vocabulary.pad_id).all()
        assert (dec.tokens[b, :n] != Vocabulary.start_id).all()
        assert (dec.tokens[b, :n] != Vocabulary.end_id).all()
        assert (dec.alphas[b, n:] == 0).all()
        torch.testing.assert_close(dec.alphas[b, :n].sum(-1), torch.ones(n))
    assert torch.isfinite(dec.scores).all() and (dec.scores <= 0).all()


def _force_word(model: ShowAttendTell, word: int) -> None:
    """Make the output layer always prefer ``word``."""
    with torch.no_grad():
        model.decoder.L_o.weight.zero_()
        model.decoder.L_o.bias.zero_()
        model.decoder.L_o.bias[word] = 10.0


def test_greedy_decode_respects_max_len_without_end():
    model = build_model().eval()
    _force_word(model, 7)
    dec = greedy_decode(model, random_images(2), max_len=4)
    assert dec.tokens.shape == (2, 4)
    assert (dec.tokens == 7).all()
    assert dec.lengths.tolist() == [4, 4]
    assert dec.ended.tolist() == [False, False]


def test_greedy_decode_immediate_end():
    model = build_model().eval()
    _force_word(model, Vocabulary.end_id)
    dec = greedy_decode(model, random_images(2), max_len=4)
    assert dec.tokens.shape[1] <= 1  # at most the step that emitted <end>, as padding
    assert (dec.tokens == Vocabulary.pad_id).all()
    assert dec.lengths.tolist() == [0, 0]
    assert dec.ended.tolist() == [True, True]


def test_greedy_decode_never_emits_pad_or_start():
    model = build_model().eval()
    with torch.no_grad():
        model.decoder.L_o.bias[Vocabulary.pad_id] = 100.0
        model.decoder.L_o.bias[Vocabulary.start_id] = 90.0
    dec = greedy_decode(model, random_images(2), max_len=3)
    assert (dec.tokens != Vocabulary.start_id).all()
    assert dec.lengths.tolist() == [dec.tokens.shape[1]] * 2


@pytest.mark.parametrize("attention, mode", [("soft", "expected"), ("hard", "expected"), ("hard", "argmax")])
def test_greedy_decode_is_deterministic_and_batch_independent(attention, mode):
    model = build_model(model__attention=attention, model__decoder__dropout=0.5).eval()
    images = random_images(4)
    a = greedy_decode(model, images, max_len=6, mode=mode)
    b = greedy_decode(model, images, max_len=6, mode=mode)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)
    for i in range(4):
        alone = greedy_decode(model, images[i : i + 1], max_len=6, mode=mode)
        n = int(a.lengths[i])
        assert int(alone.lengths[0]) == n
        assert torch.equal(alone.tokens[0, :n], a.tokens[i, :n])
        assert bool(alone.ended[0]) == bool(a.ended[i])
        torch.testing.assert_close(alone.scores[0], a.scores[i])


# ============================================================================ overfitting


def test_overfits_a_tiny_batch_and_decodes_it_back():
    torch.manual_seed(0)
    cfg = make_config(model__encoder__fine_tune_from=None, model__decoder__dropout=0.0)
    model = ShowAttendTell(cfg.model, V)
    rows = [[4, 5, 8], [4, 6, 9, 12, 4, 7], [10, 11], [4, 5, 9, 12, 13]]
    captions = make_captions(rows)
    targets = captions[:, 1:]
    images = random_images(4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    for _ in range(200):
        out = model(images, captions)
        terms = caption_loss(cfg.loss, out, targets, terms=model.mechanism.loss_terms)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(images, captions)
        terms = caption_loss(cfg.loss, out, targets, terms=model.mechanism.loss_terms)
    assert terms.token_nll.item() < 0.1
    dec = greedy_decode(model, images, max_len=8)
    assert dec.ended.all()
    assert dec.lengths.tolist() == [len(r) for r in rows]
    for i, r in enumerate(rows):
        assert dec.tokens[i, : len(r)].tolist() == r
    # Decoding each image alone gives the same captions.
    for i, r in enumerate(rows):
        alone = greedy_decode(model, images[i : i + 1], max_len=8)
        assert alone.tokens[0, : len(r)].tolist() == r and int(alone.lengths[0]) == len(r)


# ============================================================================ encoder grid


def test_encoder_warns_once_when_the_grid_would_repeat_cells():
    """resnet18 layer2 has stride 8: 32 px images give a 4x4 map; an 8x8 grid repeats every cell."""
    encoder = Encoder(EncoderConfig(backbone="resnet18", stage="layer2", grid_size=8, weights="none"))
    with pytest.warns(UserWarning, match=r"4x4 map for 32x32 images.*repeats cells: at most 16 distinct of 64"):
        features, _ = encoder(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 64, 128)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(torch.randn(1, 3, 32, 32))  # warned once for this map size
        encoder(torch.randn(1, 3, 64, 64))  # 8x8: native, no warning
