"""Hard attention trained as the authors' capgen.py trains it: the REINFORCE baseline tracks the
cost it is subtracted from, and the REINFORCE and entropy gradients on alpha have the authors'
strength relative to the batch-mean NLL. Also the no-attention control (model.attention none)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from captioning.config import LossConfig
from captioning.losses import caption_loss
from captioning.models import ShowAttendTell
from captioning.training.module import CaptioningModule
from captioning.vocab import Vocabulary
from conftest import TINY_WORDS, make_captions, make_config, random_images
from captioning.vocab import SPECIALS

WORDS = list(SPECIALS) + list(TINY_WORDS)
V = len(WORDS)


def _capgen_alpha_gradient(token_nll, token_mask, alphas, samples, baseline, reward_scale, entropy):
    """The gradient capgen injects on alpha (known_grads, RL_sumCost=True), written out in numpy
    terms: masked_cost [B, T] = NLL * mask, C_n = masked_cost.mean over T (padded length),
    g[n, t, i] = (C_n - b) * reward_scale * s[n, t, i] / alpha[n, t, i]
                 + entropy * (log alpha[n, t, i] + 1),
    with no 1/B, beside ``cost.mean()`` over captions."""
    cost = (token_nll * token_mask).mean(1)  # (B,) masked_cost.mean(0) in capgen's [T, B] layout
    return (cost - baseline)[:, None, None] * reward_scale * samples / alphas + entropy * (alphas.log() + 1)


def test_reinforce_and_entropy_gradient_on_alpha_is_capgens():
    torch.manual_seed(0)
    B, T, L = 5, 6, 7
    lengths = torch.tensor([6, 5, 4, 2, 3])
    token_mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    targets = torch.where(token_mask, torch.full((B, T), 5), torch.full((B, T), Vocabulary.pad_id))
    token_nll = torch.rand(B, T) * 3 * token_mask  # fixed: only alpha is differentiated here
    alphas = torch.softmax(torch.randn(B, T, L), -1).requires_grad_(True)
    samples_idx = torch.multinomial(alphas.detach().view(-1, L), 1).view(B, T)
    baseline = torch.tensor(0.37)

    def alpha_gradient(cfg: LossConfig, **kwargs) -> torch.Tensor:
        log_probs = alphas.log().gather(2, samples_idx[..., None]).squeeze(-1) * token_mask  # log alpha_{s_t}
        terms = caption_loss(cfg, None, targets, alphas, torch.ones(B, L, dtype=torch.bool), Vocabulary.pad_id,
                             "hard", log_probs=log_probs, baseline=baseline, token_nll=token_nll, **kwargs)
        return torch.autograd.grad(terms.loss, alphas)[0]

    cfg = LossConfig()  # the defaults: lambda_r 0.1, lambda_e 0.002, hard_reduction "sum"
    grad = alpha_gradient(cfg)
    samples = torch.nn.functional.one_hot(samples_idx, L).float()
    expected = _capgen_alpha_gradient(token_nll, token_mask.float(), alphas.detach(), samples, baseline,
                                      cfg.reward_scale, cfg.entropy)
    # Real steps: the authors' gradient exactly; padded steps (capgen applies it there too): none.
    real = token_mask[:, :, None].expand(B, T, L)
    torch.testing.assert_close(grad[real], expected[real], rtol=1e-5, atol=1e-7)
    assert (grad[~real] == 0).all()
    # The averaged form is B times weaker, and the scale follows the captions of the whole step.
    torch.testing.assert_close(alpha_gradient(LossConfig(hard_reduction="mean")) * B, grad, rtol=1e-5, atol=1e-8)
    # e.g. 4 DDP ranks, which average their gradients: each rank's terms 4 times its own batch's sum
    torch.testing.assert_close(alpha_gradient(cfg, captions_per_step=4 * B), 4 * grad, rtol=1e-5, atol=1e-7)


def test_reinforce_cost_is_capgens_masked_cost_mean():
    from captioning.losses import reinforce_cost

    # The example: lengths [8, 7, 5, 4, 3] in one padded batch (T = 8).
    nll = torch.tensor([3.12, 2.40, 1.86, 1.61, 0.96]) * 8
    torch.testing.assert_close(reinforce_cost(nll, 8), torch.tensor([3.12, 2.40, 1.86, 1.61, 0.96]))


def _hard_module(**overrides):
    cfg = make_config(model__attention="hard", **overrides)
    from captioning.config import to_dict

    return CaptioningModule(to_dict(cfg), WORDS)


def test_baseline_tracks_the_mean_reinforce_cost(monkeypatch):
    """b moves towards mean_n C_n (C_n = summed NLL / padded length), the quantity it is subtracted
    from (capgen: masked_cost for both), not towards the NLL per real token."""
    torch.manual_seed(0)
    module = _hard_module()
    module.train()
    captured = {}
    import captioning.training.module as module_py

    real_loss = module_py.caption_loss

    def spy(*args, **kwargs):
        captured["terms"] = terms = real_loss(*args, **kwargs)
        captured["T"] = args[2].shape[1]
        return terms

    monkeypatch.setattr(module_py, "caption_loss", spy)
    # One process, no logger: a stand-in trainer whose all-reduce is the identity.
    module._trainer = SimpleNamespace(world_size=1, global_step=0, global_rank=0,
                                      strategy=SimpleNamespace(reduce=lambda value, reduce_op="mean": value))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
    # Lengths 8, 7, 5, 4, 3 words (+ <end>): per-token and per-padded-step means differ a lot.
    rows = [[4, 5, 6, 7, 8, 9, 10, 11], [4, 5, 6, 7, 8, 9, 10], [4, 5, 6, 7, 8], [4, 5, 6, 7], [4, 5, 6]]
    batch = {"images": random_images(5), "captions": make_captions(rows)}
    module.training_step(batch, 0)
    terms, T = captured["terms"], captured["T"]
    mean_cost = (terms.nll_per_caption.detach() / T).mean()
    assert float(module.baseline.value) == pytest.approx(0.1 * float(mean_cost), rel=1e-5)
    # ... which is well away from what the per-token NLL would have given.
    assert abs(float(mean_cost) - float(terms.token_nll.detach())) > 0.1 * float(terms.token_nll.detach())


# ------------------------------------------------------------------------- no-attention control


def test_no_attention_context_is_the_mean_annotation():
    torch.manual_seed(0)
    cfg = make_config(model__attention="none")
    model = ShowAttendTell(cfg.model, V).eval()
    assert not any("attention" in name for name, _ in model.named_parameters())  # no f_att built
    images = random_images(3)
    features, mask = model.encode(images)
    mask = mask.clone()
    mask[0, -3:] = False  # a padded image: its mean is over the real locations only
    keys = model.decoder.project(features)
    h = torch.randn(6, cfg.model.decoder.hidden_dim)  # 2 rows (beams) per image
    att = model.decoder.attention(features, keys, mask, h)
    L = mask.shape[1]
    expected_alpha = mask.float() / mask.float().sum(1, keepdim=True)
    torch.testing.assert_close(att.alpha, expected_alpha.repeat_interleave(2, 0))
    assert att.alpha[0, -3:].eq(0).all() and att.alpha[0, 0].item() == pytest.approx(1 / (L - 3))
    means = (features * expected_alpha[..., None]).sum(1)
    torch.testing.assert_close(att.context, means.repeat_interleave(2, 0))
    assert att.log_prob is None and att.location is None
    with pytest.raises(ValueError, match="attention 'none' has no 'sample' mode"):
        model.decoder.attention(features, keys, mask, h, mode="sample")


def test_no_attention_trains_through_the_plain_loop_with_the_gate():
    torch.manual_seed(0)
    cfg = make_config(model__attention="none")
    model = ShowAttendTell(cfg.model, V).train()
    captions = make_captions([[4, 5, 6], [7, 8]])
    out = model(random_images(2), captions, return_logits=False)
    assert out.log_probs is None and out.token_nll.shape == (2, captions.shape[1] - 1)
    L = out.alphas.shape[-1]
    torch.testing.assert_close(out.alphas[0], torch.full_like(out.alphas[0], 1 / L))
    terms = caption_loss(cfg.loss, None, captions[:, 1:], out.alphas, out.mask, Vocabulary.pad_id, "none",
                         token_nll=out.token_nll)
    terms.loss.backward()
    gate = model.decoder.gate.weight.grad  # beta applies as for soft attention
    assert gate is not None and gate.abs().sum() > 0
    assert math.isfinite(float(terms.loss.detach()))
