"""Hard attention trained as the authors' capgen.py trains it: the REINFORCE baseline tracks the
cost it is subtracted from, and the REINFORCE and entropy gradients on alpha have the authors'
strength relative to the batch-mean NLL. Also the no-attention control (model.attention none)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from captioning.config import LossConfig, to_dict
from captioning.losses import caption_loss
from captioning.models import ShowAttendTell
from captioning.models.attention import HardAttention
from captioning.models.decoder import DecoderOutput
from captioning.training.module import CaptioningModule
from captioning.vocab import Vocabulary
from conftest import TINY_WORDS, make_captions, make_config, random_images
from captioning.vocab import SPECIALS

WORDS = list(SPECIALS) + list(TINY_WORDS)
HARD = HardAttention.loss_terms  # REINFORCE and the entropy bonus
V = len(WORDS)


def _capgen_alpha_gradient(token_nll, token_mask, alphas, samples, baseline, reward_scale, entropy):
    """The gradient capgen injects on alpha (known_grads, RL_sumCost=True), written out in numpy
    terms: masked_cost [B, T] = NLL * mask, C_n = masked_cost.mean over T,
    g[n, t, i] = (C_n - b) * reward_scale * s[n, t, i] / alpha[n, t, i]
                 + entropy * (log alpha[n, t, i] + 1),
    with no 1/B, beside ``cost.mean()`` over captions. capgen's minibatches hold captions of one
    length (homogeneous_data.py), so T is every caption's own length."""
    cost = (token_nll * token_mask).mean(1)  # (B,) masked_cost.mean(0) in capgen's [T, B] layout
    return (cost - baseline)[:, None, None] * reward_scale * samples / alphas + entropy * (alphas.log() + 1)


def test_reinforce_and_entropy_gradient_on_alpha_is_capgens():
    torch.manual_seed(0)
    B, T, L = 5, 6, 7
    token_mask = torch.ones(B, T, dtype=torch.bool)  # one length, as capgen's iterator batches them
    targets = torch.where(token_mask, torch.full((B, T), 5), torch.full((B, T), Vocabulary.pad_id))
    token_nll = torch.rand(B, T) * 3 * token_mask  # fixed: only alpha is differentiated here
    alphas = torch.softmax(torch.randn(B, T, L), -1).requires_grad_(True)
    samples_idx = torch.multinomial(alphas.detach().view(-1, L), 1).view(B, T)
    baseline = torch.tensor(0.37)

    def alpha_gradient(cfg: LossConfig, **kwargs) -> torch.Tensor:
        log_probs = alphas.log().gather(2, samples_idx[..., None]).squeeze(-1) * token_mask  # log alpha_{s_t}
        out = DecoderOutput(None, alphas, log_probs, torch.ones(B, L, dtype=torch.bool), token_nll)
        terms = caption_loss(cfg, out, targets, terms=HARD, baseline=baseline, **kwargs)
        return torch.autograd.grad(terms.loss, alphas)[0]

    cfg = LossConfig(hard_reduction="sum")  # the authors' strength; lambda_r 0.1, lambda_e 0.002
    grad = alpha_gradient(cfg)
    samples = torch.nn.functional.one_hot(samples_idx, L).float()
    expected = _capgen_alpha_gradient(token_nll, token_mask.float(), alphas.detach(), samples, baseline,
                                      cfg.reward_scale, cfg.entropy)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    # The averaged form (the default: Eq. 12's 1/N) is B times weaker, and the scale follows the
    # captions of the whole step.
    mean = alpha_gradient(LossConfig())
    assert LossConfig().hard_reduction == "mean"
    torch.testing.assert_close(mean * B, grad, rtol=1e-5, atol=1e-8)
    # e.g. 4 DDP ranks, which average their gradients: each rank's terms 4 times its own batch's sum
    torch.testing.assert_close(alpha_gradient(cfg, captions_per_step=4 * B), 4 * grad, rtol=1e-5, atol=1e-7)


def test_padded_steps_get_no_reinforce_or_entropy_gradient():
    """capgen applies its known gradient at padded steps too; we mask them (they carry no word)."""
    torch.manual_seed(0)
    B, T, L = 3, 5, 4
    token_mask = torch.arange(T)[None] < torch.tensor([5, 3, 2])[:, None]
    targets = torch.where(token_mask, torch.full((B, T), 5), torch.full((B, T), Vocabulary.pad_id))
    alphas = torch.softmax(torch.randn(B, T, L), -1).requires_grad_(True)
    log_probs = alphas.log()[..., 0] * token_mask
    out = DecoderOutput(None, alphas, log_probs, torch.ones(B, L, dtype=torch.bool), torch.rand(B, T))
    terms = caption_loss(LossConfig(), out, targets, terms=HARD, baseline=torch.tensor(0.3))
    grad = torch.autograd.grad(terms.loss, alphas)[0]
    assert (grad[~token_mask] == 0).all() and (grad[token_mask] != 0).any()


def test_reinforce_cost_is_the_captions_mean_nll_per_real_token():
    """C_n as capgen means it: its minibatches hold captions of one length, so masked_cost.mean(0)
    is the caption's summed NLL over its own tokens divided by its own length."""
    from captioning.losses import reinforce_cost

    lengths = torch.tensor([8, 7, 5, 4, 3])
    token_mask = torch.arange(8)[None] < lengths[:, None]
    per_token = torch.tensor([3.12, 2.40, 1.86, 1.61, 0.96])
    torch.testing.assert_close(reinforce_cost(per_token * lengths, token_mask), per_token)


def test_a_captions_cost_does_not_change_when_a_longer_caption_joins_its_batch():
    torch.manual_seed(0)
    V_, L = 12, 4

    def costs(rows: list[list[int]], nll_rows: list[list[float]]) -> torch.Tensor:
        T = max(len(r) for r in rows)
        targets = torch.full((len(rows), T), Vocabulary.pad_id)
        token_nll = torch.zeros(len(rows), T)
        for i, (r, n) in enumerate(zip(rows, nll_rows)):
            targets[i, :len(r)] = torch.tensor(r)
            token_nll[i, :len(n)] = torch.tensor(n)
        alphas = torch.full((len(rows), T, L), 1 / L)
        out = DecoderOutput(None, alphas, torch.zeros(len(rows), T), torch.ones(len(rows), L, dtype=torch.bool),
                            token_nll)
        terms = caption_loss(LossConfig(), out, targets, terms=HARD, baseline=torch.tensor(0.0))
        return terms.cost

    short = [[5, 6, 3]], [[1.0, 2.0, 0.5]]
    alone = costs(*short)
    with_longer = costs(short[0] + [[5, 6, 7, 8, 9, 10, 3]], short[1] + [[0.1] * 7])
    torch.testing.assert_close(with_longer[0], alone[0])
    assert float(alone[0]) == pytest.approx(3.5 / 3)


def test_leave_one_out_samples_average_every_term_and_use_the_other_draws_as_baseline():
    """loss.samples K: K draws per caption; each draw's baseline is the mean cost of the other K - 1."""
    from captioning.losses import leave_one_out_baseline

    cost = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # 2 captions x 3 draws
    torch.testing.assert_close(leave_one_out_baseline(cost, 3), torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))
    torch.manual_seed(0)
    B, K, T, L = 2, 3, 4, 5
    targets = torch.full((B * K, T), 5)
    token_nll = torch.rand(B * K, T)
    alphas = torch.softmax(torch.randn(B * K, T, L), -1).requires_grad_(True)
    log_probs = alphas.log()[..., 1]
    cfg = LossConfig()
    out = DecoderOutput(None, alphas, log_probs, torch.ones(B * K, L, dtype=torch.bool), token_nll)
    terms = caption_loss(cfg, out, targets, terms=HARD, baseline=None, samples=K)
    c = token_nll.mean(1)
    advantage = c - leave_one_out_baseline(c, K)
    torch.testing.assert_close(terms.advantage, advantage)
    expected = cfg.reward_scale * (advantage * log_probs.sum(1)).mean()
    torch.testing.assert_close(terms.reinforce, expected)
    torch.testing.assert_close(terms.nll, token_nll.sum(1).mean())  # mean over captions of mean over draws
    # With "sum", the scale is the captions of the step (B), not the rows (B * K).
    summed = caption_loss(LossConfig(hard_reduction="sum"), out, targets, terms=HARD, samples=K)
    torch.testing.assert_close(summed.reinforce, B * expected)


def _capgen_adam(p0: np.ndarray, grads: list[np.ndarray], lr: float = 2e-4) -> np.ndarray:
    """capgen's optimizers.py ``adam``, written out in float64: b1 = 0.1, b2 = 0.001, e = 1e-8,
    lr_t = lr0 * sqrt(1 - b2^t) / (1 - b1^t), p <- p - lr_t * m_t / (sqrt(v_t) + e)."""
    p, m, v = p0.astype(np.float64), np.zeros_like(p0, np.float64), np.zeros_like(p0, np.float64)
    for t, g in enumerate(grads, 1):
        m = 0.1 * g + (1.0 - 0.1) * m
        v = 0.001 * g ** 2 + (1.0 - 0.001) * v
        p = p - lr * (np.sqrt(1.0 - 0.001 ** t) / (1.0 - 0.1 ** t)) * m / (np.sqrt(v) + 1e-8)
    return p


def test_adam_without_bias_correction_is_capgens_update_over_20_steps():
    """optim.adam_bias_correction false, lr 2e-4, constant: the optimiser the training module builds
    moves every parameter as capgen's adam does, to 1e-6 over 20 updates, gradients of every scale
    (the smallest ones where epsilon's place decides the step)."""
    module = CaptioningModule(to_dict(make_config(optim__adam_bias_correction=False, optim__lr=2e-4,
                                                  optim__encoder_lr=2e-4, optim__schedule="constant")), WORDS)
    optimizer = module.configure_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = [p.detach().numpy().copy() for p in params]
    rng = np.random.default_rng(0)
    scales = [10.0 ** rng.integers(-9, 1) for _ in params]  # one gradient scale per tensor, 1e-9 to 1
    grads = [[(rng.standard_normal(p.shape) * s).astype(np.float32) for p, s in zip(params, scales)]
             for _ in range(20)]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = torch.from_numpy(g)
        optimizer.step()
    worst = max(np.abs(p.detach().numpy() - _capgen_adam(p0, [step[i] for step in grads])).max()
                for i, (p, p0) in enumerate(zip(params, start)))
    assert worst < 1e-6
    # torch's Adam with capgen's lr factor (the former switch) lands measurably elsewhere where
    # epsilon matters: the update is not a rescaled torch Adam.
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([q], lr=2e-4 * math.sqrt(1 - 0.001) / 0.9 / (math.sqrt(1 - 0.999) / 0.1))
    q.grad = torch.full((3,), 1e-8, dtype=torch.float64)
    adam.step()
    capgen_step = _capgen_adam(np.zeros(3), [np.full(3, 1e-8)])
    assert abs(q.detach().numpy()[0] - capgen_step[0]) > 1e-5


def _hard_module(**overrides):
    cfg = make_config(model__attention="hard", **overrides)
    from captioning.config import to_dict

    return CaptioningModule(to_dict(cfg), WORDS)


def test_baseline_tracks_the_mean_reinforce_cost(monkeypatch):
    """b moves towards mean_n C_n (C_n = the caption's NLL per real token), the quantity it is
    subtracted from (capgen: masked_cost for both), not towards the batch's NLL per real token."""
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
    terms = captured["terms"]
    lengths = torch.tensor([len(r) + 1 for r in rows])  # + <end>
    mean_cost = (terms.nll_per_caption.detach() / lengths).mean()
    assert float(module.baseline.value) == pytest.approx(0.1 * float(mean_cost), rel=1e-5)
    # ... which differs from the batch's NLL per real token (long captions weigh more there).
    assert float(mean_cost) != pytest.approx(float(terms.token_nll.detach()), rel=1e-3)


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
    out = model(random_images(2), captions)
    assert out.log_probs is None and out.logits.shape[:2] == (2, captions.shape[1] - 1)
    L = out.alphas.shape[-1]
    torch.testing.assert_close(out.alphas[0], torch.full_like(out.alphas[0], 1 / L))
    terms = caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms)
    terms.loss.backward()
    gate = model.decoder.gate.weight.grad  # beta applies as for soft attention
    assert gate is not None and gate.abs().sum() > 0
    assert math.isfinite(float(terms.loss.detach()))
