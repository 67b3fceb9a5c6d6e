"""The text path on CPU without downloads: tokenizers trained locally, packed corpora and prompt/response
files, Hugging Face models built from configs (taps, LoRA, missing checkpoints), the engine on text
(perplexity, accumulation invariance of every text loss, mid-epoch resume), generation and ROUGE-L, and
the text quickstart end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kdrun.config import validate
from kdrun.data.text import IGNORE_INDEX, check_same_vocabulary, instructions, text_corpus, train_tokenizer
from kdrun.engine import run
from kdrun.engine.generation import rouge_l
from kdrun.errors import KdrunError
from kdrun.models.hf import causal_lm
from tests.conftest import REPO, compose_cfg

TOK = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}
FAST = ["trainer.progress=off", "trainer.tensorboard=false", "trainer.device=cpu", "trainer.eval_every_steps=null"]
TINY = ["data.source.tokenizer.train.vocab_size=300", "data.source.seq_len=16", "data.source.max_train_blocks=64",
        "data.source.max_test_blocks=16", "data.batch_size=8", "stages.teacher.max_steps=4", "stages.distill.max_steps=4",
        "teacher.net.config.hidden_size=32", "teacher.net.config.intermediate_size=64", "student.net.config.hidden_size=16",
        "student.net.config.intermediate_size=32"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path_factory.getbasetemp() / "kdrun-cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


QA = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(6) for b in range(6)]


# ------------------------------------------------------------------------------------------- data
def test_trained_tokenizer_is_cached_and_has_pad_and_eos():
    tok = train_tokenizer("pydoc_topics", 300)
    again = train_tokenizer("pydoc_topics", 300)
    assert tok.get_vocab() == again.get_vocab() and len(tok) == 300
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"


def test_packed_corpus_labels_are_the_next_tokens():
    splits = text_corpus(TOK, seq_len=32, max_train_blocks=20, max_test_blocks=5)
    tr = splits.train
    assert tr["input_ids"].shape == (20, 32) and splits.test["input_ids"].shape == (5, 32)
    assert torch.equal(tr["labels"][:, :-1], tr["input_ids"][:, 1:])  # shifted once, here, and never again
    assert torch.equal(tr["labels"][:-1, -1], tr["input_ids"][1:, 0])  # blocks are consecutive
    assert tr["token_mask"].all() and tr["attention_mask"].all()


def test_prompt_tokens_are_not_scored_and_responses_are(tmp_path):
    splits = instructions(TOK, _jsonl(tmp_path / "qa.jsonl", QA), max_length=48, padding="max_length")
    tok = splits.tokenizer
    f = splits.train
    for i in range(3):
        plen = int(f["prompt_length"][i])
        labels, mask = f["labels"][i], f["token_mask"][i]
        assert not mask[:plen - 1].any() and mask[plen - 1]  # the last prompt position predicts the first response token
        scored = labels[mask].tolist()
        assert scored[-1] == tok.eos_token_id
        text = tok.decode(scored[:-1])
        assert text.endswith("is " + text.split(" is ")[-1]) and "plus" in text
        n = int(f["attention_mask"][i].sum())
        assert (labels[n:] == IGNORE_INDEX).all() and (f["input_ids"][i, n:] == tok.pad_token_id).all()
    assert len(splits.test["input_ids"]) == round(len(QA) * 0.1)


def test_dynamic_padding_cuts_each_batch_to_its_longest(tmp_path):
    from kdrun.data.tensors import TensorLoader

    splits = instructions(TOK, _jsonl(tmp_path / "qa.jsonl", QA), max_length=64)
    loader = TensorLoader(splits.train, batch_size=4, train=True, device=torch.device("cpu"), trim_field=splits.trim_field)
    widths = []
    for batch in loader:
        w = batch["input_ids"].shape[1]
        widths.append(w)
        assert int(batch["attention_mask"].sum(1).max()) == w < 64
        assert batch["labels"].shape[1] == w and batch["prompt_length"].shape == (batch["input_ids"].shape[0],)
    assert len(widths) == len(loader)


def test_data_errors_name_the_field_the_file_and_the_fix(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(KdrunError, match=r"no field \['answer'\].*response_field"):
        instructions(TOK, path, response_field="answer")
    with pytest.raises(KdrunError, match="no file or directory"):
        instructions(TOK, str(tmp_path / "missing.jsonl"))
    with pytest.raises(KdrunError, match="prompt has .* tokens.*max_length=4"):
        instructions(TOK, path, max_length=4)
    with pytest.raises(KdrunError, match="overflow=truncate"):
        instructions(TOK, path, max_length=20, overflow="error")
    cut = instructions(TOK, path, max_length=20, overflow="truncate", padding="max_length")
    assert cut.train["input_ids"].shape[1] == 20


def test_different_vocabularies_are_refused_by_name():
    a, b = train_tokenizer("pydoc_topics", 300), train_tokenizer("pydoc_topics", 320)
    check_same_vocabulary(a, a)
    with pytest.raises(KdrunError, match="differ.*sequence-level KD"):
        check_same_vocabulary(a, b)


# ----------------------------------------------------------------------------------------- models
def _tiny(**kw):
    cfg = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
    return causal_lm(config=cfg, num_classes=50, **kw)


def test_hf_model_taps_and_outputs():
    model = _tiny()
    assert {"embed", "hidden.0", "hidden.1", "final_norm"} <= set(model.taps)
    out = model(input_ids=torch.randint(0, 50, (2, 7)))
    assert set(out.keys()) == {"logits"} and out.logits.shape == (2, 7, 50)  # no key/value cache in the output


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_other_families_get_layer_taps(model_type):
    from kdrun.models.hf import encoder, sequence_classifier

    if model_type == "gpt2":
        model = causal_lm(config={"model_type": "gpt2", "n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 32}, num_classes=40)
        assert model.taps["final_norm"] == "transformer.ln_f"
    else:
        model = sequence_classifier(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 3,
                                            "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 40}, num_classes=2)
        assert model(input_ids=torch.randint(0, 40, (2, 5))).logits.shape == (2, 2)
        assert "hidden.2" in encoder(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 3,
                                             "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 40}).taps
    assert [t for t in model.taps if t.startswith("hidden.")] == ["hidden.0", "hidden.1", "hidden.2"]


def test_a_missing_checkpoint_is_one_message_with_the_fixes(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(KdrunError) as err:
        causal_lm(path="gpt2-xl")
    assert time.perf_counter() - t0 < 20  # offline: no retries against the Hub
    text = str(err.value)
    assert "net.path" in text and "gpt2-xl" in text and "HF_HUB_OFFLINE" in text and "--local-dir" in text
    with pytest.raises(KdrunError, match="no directory"):
        causal_lm(path=str(tmp_path / "nothing" / "here"))
    with pytest.raises(KdrunError, match="exactly one"):
        causal_lm()


def test_a_local_save_pretrained_directory_loads(tmp_path):
    model = _tiny()
    model.save_pretrained(str(tmp_path / "m"))
    again = causal_lm(path=str(tmp_path / "m"), dtype="bfloat16")
    assert next(again.parameters()).dtype == torch.bfloat16
    x = torch.randint(0, 50, (1, 5))
    assert torch.allclose(again(input_ids=x).logits.float(), model(input_ids=x).logits, atol=0.1)


# ----------------------------------------------------------------------------------------- engine
def _cfg(tmp_path, extra, recipe="text_quickstart"):
    return validate(compose_cfg(FAST + TINY + list(extra), recipe=recipe))


def test_text_run_reports_perplexity_and_exports_hf_directories(tmp_path, capsys):
    summary = run(_cfg(tmp_path, []), tmp_path / "run")
    assert summary["best_ppl"] is not None and summary["last_ppl"] == pytest.approx(summary["stages"]["distill"]["last_ppl"])
    assert summary["frozen_ppl"]["teacher"] > 1
    assert (tmp_path / "run" / "student_hf" / "config.json").is_file()
    assert (tmp_path / "run" / "student_hf" / "tokenizer.json").is_file()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_rows = [r for r in rows if "tokens_per_s" in r]
    assert epoch_rows and all(r["peak_memory_mb"] > 0 for r in epoch_rows)
    from kdrun.report import main as report

    report([str(tmp_path / "run")])
    table = capsys.readouterr().out
    assert "best ppl" in table and f"{summary['best_ppl']:.2f}" in table


def test_lora_student_trains_only_adapters_and_exports_them(tmp_path):
    cfg = _cfg(tmp_path, ["+student.net.peft={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                          "stages.distill.optimizer.lr=0.05"])
    from kdrun.engine.trainer import Trainer

    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.prepare().models["student"].state_dict().items()}
    summary = trainer.fit()
    after = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["model"]
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    adapter = tmp_path / "run" / "student_hf"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert summary["params"]["student"] > 0


def test_vocabulary_mismatch_between_models_is_a_build_error(tmp_path):
    from kdrun.build import build

    cfg = _cfg(tmp_path, ["+teacher.net.config.vocab_size=320"])
    with pytest.raises(KdrunError, match="share one tokenizer"):
        build(cfg)


@pytest.mark.parametrize("term", [
    "{_target_: kdrun.losses.TokenDivergence, kind: fkl}",
    "{_target_: kdrun.losses.TokenDivergence, kind: jsd, teacher_mix: 0.3, chunk_size: 7}",
    "{_target_: kdrun.losses.TokenDivergence, kind: srkl, skew: 0.1, top_k: 5}",
    "{_target_: kdrun.losses.TokenDivergence, kind: tvd}",
    "{_target_: kdrun.losses.TAIDLoss, t_start: 0.3, alpha: 0.05}",
])
def test_every_text_loss_is_invariant_under_gradient_accumulation(tmp_path, term):
    """One batch of 64 sequences of random lengths vs 4 micro-batches of 16 (float64): the same weights, so
    every term averages over all valid tokens of the optimizer step."""
    from tests.test_accumulation import COMMON, max_difference, student

    term = term[:-1] + ", weight: 1.0, inputs: {student: student.logits, teacher: teacher.logits, mask: batch.loss_mask}}"
    extra = COMMON + ["~loss.kd", f"+loss.kd={term}"]
    out = {}
    for name, split in (("one", ["data.batch_size=64", "trainer.accumulate_grad_batches=1"]),
                        ("four", ["data.batch_size=16", "trainer.accumulate_grad_batches=4"])):
        run(validate(compose_cfg(extra + split, recipe="synthetic_tokens_kd")), tmp_path / name)
        out[name] = student(tmp_path / name)
    assert max_difference(out["one"], out["four"]) < 1e-10


def test_generation_and_rouge_l(tmp_path):
    assert rouge_l(["The cat sat on the mat."], ["the cat sat on the mat"]) == [pytest.approx(100.0)]
    assert rouge_l(["a b c d"], ["a x c y"])[0] == pytest.approx(50.0)
    path = _jsonl(tmp_path / "qa.jsonl", QA)
    extra = ["data=instructions", f"data.source.train={path}", "data.source.tokenizer={train: {corpus: pydoc_topics, vocab_size: 300}}",
             "data.num_classes=300", "data.source.max_length=32", "data.batch_size=8",
             "+generation={models: [student], max_new_tokens: 6, seeds: [1, 2], batch_size: 4}"]
    cfg = validate(compose_cfg(FAST + [t for t in TINY if not t.startswith("data.")] + extra, recipe="text_quickstart"))
    summary = run(cfg, tmp_path / "run")
    gen = summary["generation"]["student"]
    assert len(gen["per_seed"]) == 2 and gen["examples"] == 4 and 0 <= gen["rouge_l"] <= 100
    rows = [json.loads(r) for r in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["seed"] for r in rows} == {1, 2}
    again = run(cfg, tmp_path / "again")  # seeded sampling: the same completions
    assert again["generation"]["student"]["per_seed"] == gen["per_seed"]


@pytest.mark.slow
def test_text_run_killed_mid_epoch_resumes_bit_exact(tmp_path):
    """SIGKILL at the start of distillation step 6 (after the step-3 checkpoint), resume=auto, and end with
    the weights of the uninterrupted run (64 blocks in batches of 8: 8 steps per epoch)."""
    from tests.test_resume_midepoch import kdrun

    base = ["+recipe=text_quickstart", *FAST, *TINY, "trainer.save_every_steps=3", "trainer.deterministic=true",
            "stages.teacher.max_steps=5", "stages.distill.max_steps=7"]
    proc = kdrun([*base, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = tmp_path / "conf" / "batch_transform"
    conf.mkdir(parents=True)
    (conf / "kill.yaml").write_text("_target_: tests.helpers.KillAtCall\nat: 12\n")  # call 1 is the build-time trace
    cut = [*base, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "batch_transform=kill", f"hydra.run.dir={tmp_path / 'cut'}"]
    proc = kdrun(cut, tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    record = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["record"]
    assert (record["stage_index"], record["batch"], record["stage_step"]) == (1, 3, 3)
    (conf / "kill.yaml").write_text("_target_: tests.helpers.KillAtCall\nat: 1000000\n")
    proc = kdrun([*cut, "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.slow
def test_text_quickstart_end_to_end(tmp_path):
    """The README's text quickstart in a subprocess, with the student-alone baseline: the distilled student's
    perplexity beats the student trained alone from the same weights for the same steps."""
    proc = subprocess.run([sys.executable, "-m", "kdrun", "+recipe=text_quickstart", "+compare=alone", "trainer.progress=off",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "run directory" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stages = summary["stages"]
    teacher, alone, distilled = (stages[s]["last_ppl"] for s in ("teacher", "alone", "distill"))
    assert teacher < distilled < alone, (teacher, distilled, alone)
    assert summary["wall_time_s"] < 180


def test_a_teacher_tokenizer_with_another_vocabulary_is_refused(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", QA)
    same = instructions(TOK, path, teacher_tokenizer=TOK)
    assert same.train["input_ids"].shape[0] > 0
    with pytest.raises(KdrunError, match="data.source.teacher_tokenizer: .*differ"):
        instructions(TOK, path, teacher_tokenizer={"train": {"corpus": "pydoc_topics", "vocab_size": 320}})


def test_parquet_datasets_directories_and_chat_templates(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(QA)
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    ds.save_to_disk(str(tmp_path / "qa_ds"))
    a = instructions(TOK, str(tmp_path / "qa.parquet"), padding="max_length", max_length=40)
    b = instructions(TOK, str(tmp_path / "qa_ds"), padding="max_length", max_length=40)
    assert torch.equal(a.train["input_ids"], b.train["input_ids"])
    tok = train_tokenizer("pydoc_topics", 300)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    tok.save_pretrained(str(tmp_path / "tok"))
    chat = instructions(str(tmp_path / "tok"), str(tmp_path / "qa.parquet"), chat_template="model", max_length=64,
                        padding="max_length")
    f = chat.train
    prompt = tok.decode(f["input_ids"][0, :int(f["prompt_length"][0])])
    assert prompt.startswith("<|user|>What is") and prompt.endswith("<|assistant|>")
    with pytest.raises(KdrunError, match="no chat template"):
        instructions(TOK, str(tmp_path / "qa.parquet"), chat_template="model")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = _tiny()
    b = _tiny(gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x = torch.randint(0, 50, (2, 9))
    for m in (a, b):
        m(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    assert b.is_gradient_checkpointing


def test_attention_maps_through_eager_attention():
    model = _tiny(attn_implementation="eager", config_overrides={"output_attentions": True})
    out = model(input_ids=torch.randint(0, 50, (2, 6)))
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 6, 6)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 2, 6), atol=1e-5)


def test_hidden_state_distillation_through_a_projector_and_a_layer_map(tmp_path):
    """Student layers 0 and 1 (width 16), each through a Projector sized by ``auto``, against teacher layers 0 and 1
    (width 32): cosine per token, averaged over the pairs."""
    proj = ("+adapters.{n}={{_target_: kdrun.models.adapters.Projector, in_dim: auto, out_dim: auto, "
            "inputs: {{x: student.hidden.{i}}}, target: teacher.hidden.{i}}}")
    term = ("+loss.hidden={{_target_: kdrun.losses.TokenHiddenLoss, kind: cosine, weight: 1.0, "
            "inputs: {{student: [adapters.p0, adapters.p1], teacher: {teacher}, mask: batch.token_mask}}}}")
    base = [proj.format(n="p0", i=0), proj.format(n="p1", i=1), "stages.distill.losses=[kd,hidden]"]
    with pytest.raises(KdrunError, match="layer map"):  # teacher.layers (2) + teacher.last_layer: 3 against 2
        run(_cfg(tmp_path, base + [term.format(teacher="[teacher.layers, teacher.last_layer]")]), tmp_path / "bad")
    summary = run(_cfg(tmp_path, base + [term.format(teacher="teacher.layers")]), tmp_path / "run")
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["loss/hidden"] for r in rows if "loss/hidden" in r]
    assert hidden and all(0 <= v <= 2 for v in hidden) and summary["steps"] > 0


def test_a_last_test_batch_smaller_than_the_world_joins_the_batch_before_it():
    """449 test rows in batches of 64 on 2 ranks: the last global batch (1 row) would leave rank 1 empty, which a
    Hugging Face model cannot read, so it joins batch 7; every row is still evaluated exactly once."""
    from kdrun.data.tensors import TensorLoader

    fields = {"x": torch.arange(449).view(-1, 1)}
    seen = []
    for rank in (0, 1):
        loader = TensorLoader(fields, batch_size=64, train=False, device=torch.device("cpu"), rank=rank, world_size=2)
        sizes = [b["x"].shape[0] for b in loader]
        assert len(loader) == len(sizes) == 7 and min(sizes) > 0
        assert loader.rank_sizes(6) == [33, 32]
        seen += [int(v) for b in loader for v in b["x"].flatten()]
    assert sorted(seen) == list(range(449))
    alone = TensorLoader(fields, batch_size=64, train=False, device=torch.device("cpu"))
    assert len(alone) == 8  # one process: nothing to merge
    with pytest.raises(KdrunError, match="ranks"):
        next(iter(TensorLoader({"x": torch.zeros(1, 1)}, batch_size=4, train=False, device=torch.device("cpu"), rank=0,
                               world_size=2)))
