"""KDRL's pieces: groups of samples per prompt, rule rewards, GRPO's group-normalised advantages and the
reward-guided mask of the distillation term."""
from __future__ import annotations

import pytest
import torch

from kdrun.losses import GRPOLoss
from kdrun.losses.grpo import group_advantages
from kdrun.losses.preference import sequence_log_probs
from kdrun.rewards import exact_match, final_number_match


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 3)
    g1 = torch.tensor([1.0, 0.0, 0.0])
    want1 = (g1 - g1.mean()) / (g1.std() + 1e-4)
    assert torch.allclose(a[:3], want1) and torch.allclose(a[3:], torch.zeros(3))  # equal rewards: no signal


def test_grpo_gradient_is_the_advantage_weighted_mean_log_likelihood():
    torch.manual_seed(0)
    z = torch.randn(4, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (4, 5))
    m = torch.rand(4, 5) > 0.3
    m[:, 0] = True
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    loss = GRPOLoss(group_size=2)(z, y, m, r)
    assert abs(loss.item()) < 1e-6  # advantages of each group sum to zero and the ratio is 1
    (grad,) = torch.autograd.grad(loss, z)
    a = group_advantages(r, 2)
    ref = -(a * sequence_log_probs(z, y, m) / m.sum(-1)).mean()
    (want,) = torch.autograd.grad(ref, z)
    assert torch.allclose(grad, want, atol=1e-6) and grad[2:].abs().sum() == 0  # the tied group gets nothing
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPOLoss(group_size=3).check_shapes(logits=torch.Size([4, 5, 7]), target=torch.Size([4, 5]), mask=torch.Size([4, 5]),
                                            reward=torch.Size([4]))


def test_rule_rewards():
    c = torch.tensor([[5, 6, 9, 0], [5, 7, 9, 0]])
    cm = torch.tensor([[True, True, True, False]] * 2)
    ref, rm = torch.tensor([[5, 6, 9]] * 2), torch.ones(2, 3, dtype=torch.bool)
    assert exact_match(c, cm, ref, rm).tolist() == [1.0, 0.0]
    from kdrun.data.text import train_tokenizer

    tok = train_tokenizer(vocab_size=300)
    enc = lambda texts: torch.nn.utils.rnn.pad_sequence([torch.tensor(tok(t)["input_ids"]) for t in texts], batch_first=True)  # noqa: E731
    comp = enc(["so the answer is 1,234.", "I think 12 then 13", "no idea"])
    refs = enc(["... #### 1234", "#### 13", "#### 7"])
    got = final_number_match(comp, comp != 0, refs, refs != 0, tok)
    assert got.tolist() == [1.0, 1.0, 0.0]


def test_rollout_samples_a_group_per_prompt_and_scores_it():
    from tests.test_rollout import EOS, PAD, StubLM, _batch
    from kdrun.component import BuildContext, StageInfo
    from kdrun.data.rollout import Rollout

    def first_token_is_three(completion, c_mask, reference, r_mask, tokenizer):
        return (completion[:, 0] == 3).float()

    r = Rollout(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, samples_per_prompt=4, reward=first_token_is_three)
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": StubLM()}, seed=0))
    r.on_stage_start(StageInfo(name="rl", index=0, round=0, trained_models=("student",), frozen_models=(), epochs=1,
                               max_steps=None))
    r.on_step(0, 1)
    r.on_batch((2,), 0)
    out = r(_batch())
    assert out["input_ids"].shape[0] == 8 and out["group"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert out["index"].tolist() == [10] * 4 + [11] * 4 and out["prompt_length"].tolist() == [3] * 4 + [2] * 4
    first = out["labels"][torch.arange(8), out["prompt_length"] - 1]
    assert torch.equal(out["reward"], (first == 3).float())
    assert torch.equal(out["unrewarded_token_mask"], out["token_mask"] & (out["reward"] <= 0).view(-1, 1))
    with pytest.raises(ValueError, match="on_policy_prob=1"):
        Rollout(samples_per_prompt=2, on_policy_prob=0.5)
