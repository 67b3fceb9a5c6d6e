"""On-policy and mixed data (kdrun.data.rollout.Rollout): the rebuilt batch against a hand-made one, the
prompts a model is asked to complete, seeded rollouts (the same after a resume, the global generators
untouched), GKD's mixing probability, and a run with a tiny Hugging Face student."""
from __future__ import annotations

import pytest
import torch

from kdrun.component import BuildContext, StageInfo
from kdrun.data.rollout import Rollout, rebuild

PAD, EOS = 0, 9


def _batch():
    # example 0: prompt [5, 6, 7], response [8, EOS]; example 1: prompt [4, 3], response [2, 2, 2, EOS]
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [4, 3, 2, 2, 2, 0]])
    return {"input_ids": ids, "attention_mask": (torch.arange(6) < torch.tensor([[4], [5]])).long(),
            "labels": torch.full((2, 6), -100), "token_mask": torch.zeros(2, 6, dtype=torch.bool),
            "prompt_length": torch.tensor([3, 2]), "index": torch.tensor([10, 11])}


def test_rebuild_puts_each_completion_after_its_prompt_and_scores_it():
    batch = _batch()
    prompts = torch.tensor([[5, 6, 7], [PAD, 4, 3]])  # left-padded to the longest prompt
    completions = torch.tensor([[1, EOS, PAD, PAD], [2, 3, 4, 1]])  # example 1 has no EOS: all 4 tokens count
    out = rebuild(batch, prompts, batch["prompt_length"], completions, EOS, PAD)
    # sequences: [5 6 7 1 EOS] and [4 3 2 3 4 1]; inputs drop the last token, labels are the next tokens
    assert out["input_ids"].tolist() == [[5, 6, 7, 1, PAD], [4, 3, 2, 3, 4]]
    assert out["labels"].tolist() == [[-100, -100, 1, EOS, -100], [-100, 2, 3, 4, 1]]
    assert out["token_mask"].tolist() == [[False, False, True, True, False], [False, True, True, True, True]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(out["index"], batch["index"]) and torch.equal(out["prompt_length"], batch["prompt_length"])


class StubLM(torch.nn.Module):
    """Appends ``n`` tokens drawn from the global generator (as HF sampling does) and records its prompts."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.n, self.seen = n, []
        self.lin = torch.nn.Linear(1, 1)

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen.append((input_ids.clone(), attention_mask.clone(), kwargs))
        new = torch.randint(1, 9, (input_ids.shape[0], self.n))
        return torch.cat([input_ids, new], dim=1)


def _rollout(model, prob=1.0, seed=0):
    r = Rollout(on_policy_prob=prob, max_new_tokens=3, temperature=0.9, eos_token_id=EOS, pad_token_id=PAD)
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": model}, seed=seed))
    r.on_stage_start(StageInfo(name="distill", index=0, round=0, trained_models=("student",), frozen_models=(), epochs=1,
                               max_steps=None))
    return r


def test_the_model_completes_left_padded_prompts_in_eval_mode_without_touching_the_global_generator():
    model = StubLM()
    model.train()
    r = _rollout(model)
    r.on_step(0, 10)
    r.on_batch((2,), 0)
    state = torch.get_rng_state()
    out = r(_batch())
    assert torch.equal(torch.get_rng_state(), state)
    prompts, attention, kwargs = model.seen[0]
    assert prompts.tolist() == [[5, 6, 7], [PAD, 4, 3]] and attention.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.9 and kwargs["max_new_tokens"] == 3
    assert model.training  # its mode is restored
    assert out["token_mask"].sum(1).tolist() == [3, 3] and r.generated == 1


def test_rollouts_are_a_function_of_the_run_position():
    def draw(step, micro_batches=1, rank=0):
        r = _rollout(StubLM())
        r.on_step(step, 10)
        out = None
        for _ in range(micro_batches):
            r.on_batch((2,), rank)
            out = r(_batch())
        return out["input_ids"]

    assert torch.equal(draw(3), draw(3))  # a resumed run at step 3 samples what the first run did
    assert not torch.equal(draw(3), draw(4))
    assert not torch.equal(draw(3, micro_batches=2), draw(3))  # each micro-batch of a step has its own draw
    assert not torch.equal(draw(3, rank=1), draw(3))


def _batch2():
    """Another micro-batch: three examples, prompts of 1, 4 and 2 tokens, wider than _batch's."""
    ids = torch.tensor([[3, 8, 8, 0, 0, 0, 0], [1, 2, 3, 4, 5, EOS, 0], [7, 7, 1, EOS, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.full((3, 7), -100),
            "token_mask": torch.zeros(3, 7, dtype=torch.bool), "prompt_length": torch.tensor([1, 4, 2]),
            "index": torch.tensor([12, 13, 14])}


def test_one_generate_per_step_serves_every_micro_batch_and_matches_per_micro_batch_with_one():
    model = StubLM()
    r = Rollout(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, generate_per="step")
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": model}, seed=0))
    assert r.per_step
    r.on_step(2, 10)
    r.on_batch((2,), 0)
    out = r.window([_batch(), _batch2()])
    assert r.generated == 1 and len(model.seen) == 1
    prompts, attention, _ = model.seen[0]  # all five prompts, left-padded to the longest of the step (4 tokens)
    assert prompts.tolist() == [[PAD, 5, 6, 7], [PAD, PAD, 4, 3], [PAD, PAD, PAD, 3], [1, 2, 3, 4], [PAD, PAD, 7, 7]]
    assert attention.tolist() == (prompts != PAD).long().tolist()
    assert [o["input_ids"].shape[0] for o in out] == [2, 3]
    for o, plen in zip(out, ([3, 2], [1, 4, 2])):  # each micro-batch its own rows: prompt first, then 3 sampled tokens
        assert o["token_mask"].sum(1).tolist() == [3] * len(plen)
        assert o["attention_mask"].sum(1).tolist() == [p + 2 for p in plen]
    assert out[1]["input_ids"][1, :4].tolist() == [1, 2, 3, 4] and torch.equal(out[1]["index"], _batch2()["index"])
    # with one micro-batch per step, the same rollouts as one generate per micro-batch
    single = _rollout(StubLM())
    single.on_step(2, 10)
    single.on_batch((2,), 0)
    stepwise = Rollout(max_new_tokens=3, temperature=0.9, eos_token_id=EOS, pad_token_id=PAD, generate_per="step")
    stepwise.bind(BuildContext(shapes={}, num_train=4, models={"student": StubLM()}, seed=0))
    stepwise.on_step(2, 10)
    stepwise.on_batch((2,), 0)
    a, (b,) = single(_batch()), stepwise.window([_batch()])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="generate_per"):
        Rollout(generate_per="epoch")


def test_every_rank_takes_the_same_mixing_decision_and_draws_its_own_samples():
    ranks = [_rollout(StubLM(), prob=0.5) for _ in range(2)]
    outs = [[], []]
    for step in range(40):
        for rank, r in enumerate(ranks):
            r.on_step(step, 40)
            r.on_batch((2,), rank)
            outs[rank].append(r(_batch()))
    assert ranks[0].generated == ranks[1].generated and 8 < ranks[0].generated < 32
    generated = [bool(x["token_mask"].any()) for x in outs[0]]  # the data's batch scores nothing here
    assert generated == [bool(y["token_mask"].any()) for y in outs[1]]  # step by step, the same decision
    pairs = [(x, y) for x, y, g in zip(outs[0], outs[1], generated) if g]
    assert pairs and all(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in pairs)


def test_gkd_mixing_generates_with_probability_lambda():
    r = _rollout(StubLM(), prob=0.5)
    for step in range(300):
        r.on_step(step, 300)
        r.on_batch((2,), 0)
        r(_batch())
    assert 110 < r.generated < 190
    off = _rollout(StubLM(), prob=0.0)
    off.on_step(0, 1)
    off.on_batch((2,), 0)
    assert off(_batch()) is not None and off.generated == 0


def test_a_rollout_needs_a_generating_model_and_prompt_lengths():
    from kdrun.errors import KdrunError

    r = Rollout(pad_token_id=PAD)
    with pytest.raises(KdrunError, match="has no generate"):
        r.bind(BuildContext(shapes={}, num_train=1, models={"student": torch.nn.Linear(1, 1)}))
    r = _rollout(StubLM())
    batch = _batch()
    del batch["prompt_length"]
    with pytest.raises(KdrunError, match="prompt_length"):
        r(batch)


def test_a_run_distils_on_the_students_own_samples(tmp_path):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    torch.manual_seed(0)
    overrides = [o for o in smoke_overrides("qwen25_gkd") if not o.startswith("trainer.max_steps_per_epoch")]
    trainer = Trainer(validate(compose_cfg(overrides, recipe="qwen25_gkd")), tmp_path)
    trainer.prepare()
    runner = trainer.stage_runner(0)
    rollout = runner.plan.batch_transform
    assert isinstance(rollout, Rollout) and rollout._model is trainer.experiment.models["student"]
    seen = []
    trainer.experiment.models["teacher"].register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"]),
                                                               with_kwargs=True)
    batch = next(iter(trainer.ctx.train_loader))
    before = rollout.generated  # (the build's shape trace generated too)
    for c in runner.hooked:
        c.on_step(0, 1)
    total, _ = runner.train_step(batch, runner.term_weights(0))
    assert rollout.generated == before + 1 and torch.isfinite(total)
    data_ids = batch["input_ids"]
    assert seen and not (seen[-1].shape == data_ids.shape and torch.equal(seen[-1], data_ids))  # the teacher scored samples


def test_sampled_token_estimators_against_their_formulas_and_the_reverse_kl():
    from kdrun.losses import SampledTokenKL

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    r = (s.log_softmax(-1).gather(-1, y[..., None]) - t.log_softmax(-1).gather(-1, y[..., None])).squeeze(-1)
    for est, per in (("k1", r), ("k2", 0.5 * r ** 2), ("k3", torch.exp(-r) - 1 + r)):
        torch.testing.assert_close(SampledTokenKL(est)(s, t, y, mask), per[mask].mean())
    # on-policy (y ~ q), k1 and k3 average to KL(q || p): a Monte Carlo check on one position
    q, p = s[0, 0].log_softmax(-1), t[0, 0].log_softmax(-1)
    kl = float((q.exp() * (q - p)).sum())
    draws = torch.multinomial(q.exp(), 200_000, replacement=True, generator=g).view(1, -1)
    big_s, big_t = s[0, 0].expand(1, draws.shape[1], 6), t[0, 0].expand(1, draws.shape[1], 6)
    ones = torch.ones_like(draws, dtype=torch.bool)
    for est in ("k1", "k3"):
        assert float(SampledTokenKL(est)(big_s, big_t, draws, ones)) == pytest.approx(kl, rel=0.03)


def _replay(model, tau=1.0, capacity=4, seed=0):
    from kdrun.data.rollout import AdaptiveReplay

    r = AdaptiveReplay(capacity=capacity, init_threshold=tau, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": model}, seed=seed))
    r.on_stage_start(StageInfo(name="distill", index=0, round=0, trained_models=("student",), frozen_models=(), epochs=1,
                               max_steps=None))
    return r


def _steps(r, steps, total, rank=0, start=0):
    outs = []
    for step in range(start, start + steps):
        r.on_step(step, total)
        r.on_batch((2,), rank)
        outs.append(r(_batch())["input_ids"])
    return outs


def test_distillm_threshold_rises_when_the_held_out_loss_rises():
    r = _replay(StubLM(), tau=0.0)
    for loss, tau in ((2.0, 0.0), (2.05, 0.0), (2.2, 0.1), (1.0, 0.1), (1.1, 0.2)):
        r.on_evaluation({"test_loss": loss})
        assert r.tau == pytest.approx(tau)
    r.tau = 0.95
    r.on_evaluation({"test_loss": 5.0})
    assert r.tau == 1.0  # capped
    off = _replay(StubLM(), tau=0.0)
    _steps(off, 5, 5)
    assert off.generated == 0 and off.replayed == 0  # tau 0: the data's batches


def test_distillm_fills_its_buffer_then_replays_more_as_the_stage_advances():
    r = _replay(StubLM(), tau=1.0, capacity=4)
    _steps(r, 2, 100)
    assert r.generated == 2 and r._stored() == 4 and r.replayed == 0  # r < tau while the buffer has room: generate
    _steps(r, 98, 100, start=2)
    # full: fresh with probability 1 - step/total (about half over the stage), else replay; the oldest leave first
    assert 30 < r.generated < 70 and r.replayed == 100 - r.generated and r._stored() == 4


def test_distillm_decisions_agree_across_ranks_and_survive_a_checkpoint():
    from kdrun.data.rollout import AdaptiveReplay

    a, b = _replay(StubLM(), tau=0.7), _replay(StubLM(), tau=0.7)
    _steps(a, 20, 40, rank=0)
    _steps(b, 20, 40, rank=1)
    assert (a.generated, a.replayed) == (b.generated, b.replayed)  # the same choices on every rank
    state = a.get_extra_state()
    path = __import__("tempfile").mkdtemp() + "/s.pt"
    torch.save(state, path)
    resumed = _replay(StubLM(), tau=0.0)
    resumed.set_extra_state(torch.load(path, weights_only=True))
    assert resumed.tau == 0.7 and len(resumed.buffer) == len(a.buffer)
    later_a = _steps(a, 20, 40, start=20)
    later_r = _steps(resumed, 20, 40, start=20)
    assert all(torch.equal(x, y) for x, y in zip(later_a, later_r))  # what an uninterrupted run would have drawn
    assert isinstance(resumed, AdaptiveReplay) and resumed.replayed == a.replayed


def test_the_replay_buffer_is_part_of_the_checkpointed_modules():
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    trainer = Trainer(validate(compose_cfg(smoke_overrides("gpt2xl_gpt2_distillm"), recipe="gpt2xl_gpt2_distillm")),
                      __import__("tempfile").mkdtemp())
    trainer.prepare()
    state = trainer.experiment.modules().state_dict()
    assert "transforms.run._extra_state" in state and "tau" in state["transforms.run._extra_state"]


def test_a_resumed_replay_buffer_is_each_ranks_own(monkeypatch):
    """Each rank restores its own buffer from the checkpoint (saved by every rank), keyed by the process's rank: the
    hooks' rank is not set yet when a checkpoint is loaded (it was, and every rank restored rank 0's buffer)."""
    import kdrun.data.rollout as rollout
    from kdrun.data.rollout import AdaptiveReplay

    r = AdaptiveReplay(max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": StubLM()}, seed=0))
    state = {"tau": 0.3, "last_loss": 1.0, "replayed": 0, "generated": 2,
             "ranks": [{"buffer": [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}]},
                       {"buffer": [{"input_ids": torch.ones(1, 2, dtype=torch.long)}]}]}
    from kdrun.engine.distributed import DistInfo

    monkeypatch.setattr(rollout, "launched_info", lambda: DistInfo(rank=1, world_size=2))
    r.set_extra_state(state)
    assert r.rank == 0 and r.buffer[0]["input_ids"].tolist() == [[1, 1]]


@pytest.mark.parametrize("per, calls", [("micro_batch", 2), ("step", 1)])
def test_a_step_of_two_micro_batches_generates_once_per_step_or_once_per_micro_batch(tmp_path, per, calls):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    torch.manual_seed(0)
    overrides = [o for o in smoke_overrides("qwen25_gkd") if not o.startswith("trainer.max_steps_per_epoch")]
    trainer = Trainer(validate(compose_cfg([*overrides, "batch_transform.on_policy_prob=1.0",
                                            f"batch_transform.generate_per={per}", "trainer.accumulate_grad_batches=2"],
                                           recipe="qwen25_gkd")), tmp_path)
    trainer.prepare()
    runner = trainer.stage_runner(0)
    rollout = runner.plan.batch_transform
    seen = []
    trainer.experiment.models["teacher"].register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"]),
                                                               with_kwargs=True)
    loader = iter(trainer.ctx.train_loader)
    window = [next(loader), next(loader)]
    before = rollout.generated
    for c in runner.hooked:
        c.on_step(0, 1)
    total, _ = runner.train_step(window, runner.term_weights(0))
    assert rollout.generated == before + calls and torch.isfinite(total)
    assert len(seen) == 2  # the teacher scored each micro-batch once, rolled out
    assert [s.shape[0] for s in seen] == [b["input_ids"].shape[0] for b in window]
