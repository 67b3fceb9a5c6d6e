"""MiniLLM's policy gradient: the discounted, length-normalised returns and the loss against a loop over the
formula."""
from __future__ import annotations

import torch

from kdrun.losses import MiniLLMLoss
from kdrun.losses.minillm import discounted_returns


def test_returns_of_the_later_tokens():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[0, 1, 1, 1]])
    assert torch.allclose(discounted_returns(r, m, 0.5, False), torch.tensor([[2 + 1.5 + 1.0, 3 + 2.0, 4.0, 0.0]]))
    assert torch.allclose(discounted_returns(r, m, 0.5, True), torch.tensor([[4.5 / 3, 5.0 / 2, 4.0, 0.0]]))


def test_loss_and_gradient_against_the_formula():
    torch.manual_seed(0)
    b, length, v, gamma = 2, 5, 6, 0.9
    zs = torch.randn(b, length, v, requires_grad=True)
    zt = torch.randn(b, length, v)
    y = torch.randint(0, v, (b, length))
    m = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    got = MiniLLMLoss(gamma=gamma, length_norm=True, chunk_size=3)(zs, zt, y, m)
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    total, count = 0.0, 0
    for i in range(b):
        for t in range(length):
            if not m[i, t]:
                continue
            later = [u for u in range(t + 1, length) if m[i, u]]
            ret = sum(gamma ** (u - t - 1) * (lt[i, u, y[i, u]] - ls[i, u, y[i, u]]).item() for u in later)
            ret = ret / max(1, len(later))
            single = (ls[i, t].exp() * (ls[i, t] - lt[i, t])).sum()
            total = total + single - ret * ls[i, t, y[i, t]]
            count += 1
    want = total / count
    assert torch.allclose(got, want, atol=1e-5)
    (g1,) = torch.autograd.grad(got, zs)
    (g2,) = torch.autograd.grad(want, zs)
    assert torch.allclose(g1, g2, atol=1e-5)  # the returns carry no gradient


def _case(seed: int, b: int, length: int, v: int):
    """Seeded student and teacher logits, sampled tokens and an all-true mask."""
    torch.manual_seed(seed)
    zs = torch.randn(b, length, v, requires_grad=True)
    return zs, torch.randn(b, length, v), torch.randint(0, v, (b, length)), torch.ones(b, length, dtype=torch.bool)


def test_importance_weights_multiply_both_terms_of_each_token():
    b, length = 2, 4
    zs, zt, y, m = _case(1, b, length, 5)
    w = torch.rand(b, length) + 0.5
    term = MiniLLMLoss(gamma=0.95, length_norm=True, chunk_size=None)
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ret = discounted_returns((lt - ls).gather(-1, y.unsqueeze(-1)).squeeze(-1).detach(), m, 0.95, True)
    per = (ls.exp() * (ls - lt)).sum(-1) - ret * ls.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(term(zs, zt, y, m, w), (w * per).mean(), atol=1e-5)
    assert torch.allclose(term(zs, zt, y, m, torch.ones(b, length)), term(zs, zt, y, m), atol=1e-6)


def _lm(seed: int, vocab: int = 12):
    from kdrun.models.hf import causal_lm

    torch.manual_seed(seed)
    return causal_lm(config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
                             "vocab_size": vocab})


def _mixed(student, teacher, alpha, max_new_tokens=3, eos=None):
    from kdrun.component import BuildContext
    from kdrun.data.rollout import Rollout

    r = Rollout(max_new_tokens=max_new_tokens, teacher_mix=alpha, eos_token_id=eos, pad_token_id=0)
    r.bind(BuildContext(shapes={}, num_train=1, models={"student": student, "teacher": teacher}, seed=0))
    return r


def test_teacher_mixed_tokens_follow_the_mixture_and_carry_its_importance_weights():
    student, teacher = _lm(0), _lm(1)
    alpha, n = 0.3, 6000
    prompts = torch.tensor([[3, 4, 5]]).repeat(n, 1)
    attention = torch.ones_like(prompts)
    seqs, log_w = _mixed(student, teacher, alpha, max_new_tokens=1)._sample_mixed(prompts, attention, key=7)
    with torch.no_grad():
        q = torch.softmax(student(input_ids=prompts[:1]).logits[0, -1], -1)
        p = torch.softmax(teacher(input_ids=prompts[:1]).logits[0, -1], -1)
    mix = (1 - alpha) * q + alpha * p
    freq = torch.bincount(seqs[:, -1], minlength=q.numel()).float() / n
    assert (freq - mix).abs().max() < 0.025  # 6000 draws: a few standard errors of the largest share
    assert ((freq - q).abs().max() > 0.03) or ((mix - q).abs().max() < 0.03)  # the mixture really differs from q
    y = seqs[:, -1]
    assert torch.allclose(log_w[:, 0], (q.log() - mix.log())[y], atol=1e-5)


def test_teacher_mixed_sampling_of_a_model_with_itself_draws_what_generate_draws():
    """With the teacher equal to the student the mixture is the student's own distribution: the kv-cached loop
    (left-padded prompts, an EOS that stops a row) draws Hugging Face's tokens from the same seed, with unit weights."""
    from kdrun.data.rollout import Rollout

    student = _lm(0)
    prompts = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    attention = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mixed, log_w = _mixed(student, student, 0.2, max_new_tokens=6, eos=2)._sample_mixed(prompts, attention, key=11)
    plain = Rollout(max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    from kdrun.component import BuildContext

    plain.bind(BuildContext(shapes={}, num_train=1, models={"student": student}, seed=0))
    want = plain._sample(prompts, attention, key=11)
    assert torch.equal(mixed, want[:, :mixed.shape[1]]) and (want[:, mixed.shape[1]:] == 0).all()
    assert log_w.abs().max() < 1e-5


def test_the_clipped_surrogate_has_the_plain_gradient_at_ratio_one_and_none_beyond_the_clip():
    zs, zt, y, m = _case(5, 2, 4, 6)
    log_y = torch.log_softmax(zs, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).detach()
    term = MiniLLMLoss(gamma=0.9, length_norm=False, chunk_size=None, clip=0.2, reward_scaling=0.5)
    plain = MiniLLMLoss(gamma=0.9, length_norm=False, chunk_size=None, reward_scaling=0.5)
    (g_ppo,) = torch.autograd.grad(term(zs, zt, y, m, old_logp=log_y), zs)
    (g_plain,) = torch.autograd.grad(plain(zs, zt, y, m), zs)
    assert torch.allclose(g_ppo, g_plain, atol=1e-6)  # rho = 1: PPO's first epoch is the plain policy gradient
    # the hand formula at other ratios: max(-rho A, -clip(rho) A), A = R / 0.5
    old = log_y + torch.tensor([[0.5, -0.5, 0.05, 0.0], [-0.05, 0.4, -0.4, 0.0]])
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ret = discounted_returns((lt - ls).gather(-1, y.unsqueeze(-1)).squeeze(-1).detach(), m, 0.9, False) / 0.5
    rho = (ls.gather(-1, y.unsqueeze(-1)).squeeze(-1) - old).exp()
    per = (ls.exp() * (ls - lt)).sum(-1) + torch.maximum(-rho * ret, -rho.clamp(0.8, 1.2) * ret)
    got = term(zs, zt, y, m, old_logp=old)
    assert torch.allclose(got, per.mean(), atol=1e-5)
    (g1,), (g2,) = torch.autograd.grad(got, zs), torch.autograd.grad(per.mean(), zs)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_a_ppo_rollout_trains_ppo_epochs_steps_on_one_generation_and_resumes_its_stored_window():
    from kdrun.component import BuildContext, StageInfo
    from kdrun.data.rollout import PPORollout

    student = _lm(0)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6, 0], [7, 8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
             "labels": torch.full((2, 5), -100), "token_mask": torch.zeros(2, 5, dtype=torch.bool),
             "prompt_length": torch.tensor([2, 2]), "index": torch.tensor([0, 1])}

    def make():
        r = PPORollout(ppo_epochs=3, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
        r.bind(BuildContext(shapes={}, num_train=2, models={"student": student}, seed=0))
        r.on_stage_start(StageInfo(name="distill", index=0, round=0, trained_models=("student",), frozen_models=(),
                                   epochs=1, max_steps=None))
        return r

    r = make()
    windows = []
    for step in range(4):
        r.on_step(step, 10)
        windows.append(r.window([dict(batch)]))
    assert r.generated == 2 and r.replayed == 2  # steps 0-2 share one generation, step 3 samples anew
    assert torch.equal(windows[0][0]["input_ids"], windows[2][0]["input_ids"])
    out = windows[0][0]
    with torch.no_grad():
        lp = torch.log_softmax(student(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits, -1)
    want = lp.gather(-1, out["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out["old_logp"][out["token_mask"]], want[out["token_mask"]], atol=1e-5)
    assert (out["old_logp"][~out["token_mask"]] == 0).all()
    # a resumed transform serves the stored window for its remaining uses
    state = r.get_extra_state()
    again = make()
    again.set_extra_state(state)
    again.on_step(4, 10)
    assert torch.equal(again.window([dict(batch)])[0]["input_ids"], windows[3][0]["input_ids"]) and again.generated == 2
