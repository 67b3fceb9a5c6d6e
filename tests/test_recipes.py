"""Every shipped recipe composes, validates, builds and trains a step: with its default models, and for
every (teacher, student) pair of its published table, on synthetic data of the recipe's shape with
random teachers. For the table pairs, deep models are swapped for shallow ones whose taps have the
same shapes (resnet110 -> resnet8, vgg13 -> vgg8, ...): the wiring is what is under test, and the
per-pair settings are checked on the real names."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.config import validate
from kdrun.engine import run
from kdrun.paths import recipe_dir
from kdrun.registry import model_node
from tests.conftest import compose_cfg

RECIPES = sorted(p.stem for p in recipe_dir().glob("*.yaml"))
# same tap shapes (channels and spatial sizes of stem, stages, feat), fewer layers
SHALLOW = {"resnet20": "resnet8", "resnet32": "resnet8", "resnet56": "resnet8", "resnet110": "resnet8",
           "resnet32x4": "resnet8x4", "wrn_40_2": "wrn_16_2", "wrn_40_1": "wrn_16_1", "vgg13": "vgg8"}


def pairs(recipe: str) -> list[tuple[str | None, str]]:
    table = (OmegaConf.load(recipe_dir() / f"{recipe}.yaml").get("published") or {}).get("table") or []
    return [(row.get("teacher"), row.student) for row in table]


_TEXT_DIR: list[str] = []


def _text_file() -> str:
    """A small local prompt/response + sentence/label file for the recipes whose data are files on disk."""
    import json
    import tempfile
    from pathlib import Path

    if not _TEXT_DIR:
        _TEXT_DIR.append(tempfile.mkdtemp(prefix="kdrun-recipes-"))
    path = Path(_TEXT_DIR[0]) / "rows.jsonl"
    if not path.exists():
        rows = [{"instruction": f"Add {a} and {b}.", "prompt": f"Add {a} and {b}.", "response": f"{a + b}",
                 "sentence": f"a {'good' if a > b else 'bad'} film {a}", "label": int(a > b),
                 "chosen": f"{a + b}", "rejected": f"{a + b + 1} or so",
                 "query": f"what is {a} plus {b}", "positive": f"{a} plus {b} is {a + b}", "negative": f"a film {b}",
                 "pos_score": float(a + b), "neg_score": float(-a)} for a in range(5) for b in range(5)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TOKENIZER = "data.source.tokenizer={train: {corpus: pydoc_topics, vocab_size: 300}}"
GPT2 = "{model_type: gpt2, n_embd: 16, n_layer: 2, n_head: 2, n_positions: 160, vocab_size: 300}"
QWEN = ("{model_type: qwen2, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 1, max_position_embeddings: 64, vocab_size: 300}")
BERT = "{model_type: bert, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 32, vocab_size: 300}"
# recipes whose default models are Hugging Face checkpoints and whose data are local files: tiny random models
# of the same families and a small local file stand in (the wiring is under test, not the weights)
HF_STANDINS = {
    "gpt2xl_gpt2_dolly": ["student.net.path=null", f"+teacher.net.config={GPT2}", f"+student.net.config={GPT2}",
                          "data.source.max_length=150"],
    "qwen25_1p5b_0p5b_instruct": ["student.net.path=null", f"+teacher.net.config={QWEN}", f"+student.net.config={QWEN}",
                                  "data.source.max_length=32", "data.source.chat_template=null"],
    "bert_sst2_kd": [f"+teacher.net.config={BERT}", f"student.net.config={BERT}", "data.source.max_length=16"],
}
HF_STANDINS["bert_sst2_sinkd"] = HF_STANDINS["bert_sst2_kd"]
# three tokenizers: the student's (300 ids) and each teacher's own (400, 500)
HF_STANDINS["bert_multiteacher_tokenizers"] = [
    "student.net.path=null", "models.teacher2.net.path=null", f"+teacher.net.config={BERT.replace('300}', '400}')}",
    f"+models.teacher2.net.config={BERT.replace('300}', '500}')}", f"+student.net.config={BERT}", "data.source.max_length=16",
    "data.source.model_tokenizers={teacher: {train: {corpus: pydoc_topics, vocab_size: 400}}, "
    "teacher2: {train: {corpus: pydoc_topics, vocab_size: 500}}}", "models.teacher2.checkpoint=null"]
HF_STANDINS["gpt2xl_gpt2_minillm"] = HF_STANDINS["gpt2xl_gpt2_dolly"] + ["batch_transform.max_new_tokens=4"]
HF_STANDINS["gpt2xl_gpt2_distillm"] = HF_STANDINS["gpt2xl_gpt2_dolly"] + ["batch_transform.max_new_tokens=4",
                                                                         "batch_transform.init_threshold=1.0"]
HF_STANDINS["qwen25_gkd"] = HF_STANDINS["qwen25_1p5b_0p5b_instruct"] + ["batch_transform.max_new_tokens=4",
                                                                     "batch_transform.on_policy_prob=1.0"]
HF_STANDINS["qwen25_onpolicy_rkl"] = HF_STANDINS["qwen25_gkd"]
HF_STANDINS["qwen25_kdrl"] = HF_STANDINS["qwen25_1p5b_0p5b_instruct"] + ["batch_transform.max_new_tokens=4"]
MIXTRAL = ("{model_type: mixtral, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
           "num_key_value_heads: 1, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 64, "
           "vocab_size: 300, output_router_logits: true}")
HF_STANDINS["qwen25_redi"] = ["student.net.path=null", f"+student.net.config={QWEN}", "data.source.max_length=32"]
HF_STANDINS["qwen25_dckd"] = HF_STANDINS["qwen25_1p5b_0p5b_instruct"]
HF_STANDINS["qwen25_distillm2"] = HF_STANDINS["qwen25_1p5b_0p5b_instruct"]
HF_STANDINS["qwen25_adpa"] = HF_STANDINS["qwen25_1p5b_0p5b_instruct"] + ["models.reference.net.path=null",
                                                                        f"+models.reference.net.config={QWEN}"]
HF_STANDINS["qwen25_adpa_cached"] = ["student.net.path=null", f"+student.net.config={QWEN}", "data.source.max_length=32",
                                     "data.source.chat_template=null"]
HF_STANDINS["llava_mod_text"] = ["student.net.path=null", f"+teacher.net.config={QWEN}", f"+student.net.config={MIXTRAL}",
                                 "data.source.max_length=32", "data.source.chat_template=null"]
HF_STANDINS["msmarco_margin_mse"] = ["student.net.path=null", f"+teacher.net.config={BERT}", f"+student.net.config={BERT}",
                                     "data.source.max_length=16", "data.source.query_max_length=8",
                                     "data.source.passage_max_length=8"]
# a teacher with its own tokenizer: trained here at another size (500 ids), the student's at 300
HF_STANDINS["qwen25_cross_tokenizer"] = ["student.net.path=null", f"+teacher.net.config={QWEN.replace('300}', '500}')}",
                                         f"+student.net.config={QWEN}", "data.source.max_length=32",
                                         "data.source.chat_template=null",
                                         "data.source.teacher_tokenizer={train: {corpus: pydoc_topics, vocab_size: 500}}",
                                         "loss.kd.teacher_tokenizer=${data.source.teacher_tokenizer}"]
HF_STANDINS["qwen25_gold"] = HF_STANDINS["qwen25_cross_tokenizer"] + ["batch_transform.max_new_tokens=4",
                                                                  "batch_transform.on_policy_prob=1.0"]
HF_STANDINS["qwen25_seqkd_cross_tokenizer"] = HF_STANDINS["qwen25_cross_tokenizer"][:-1] + ["batch_transform.max_new_tokens=4"]


_CACHE_DIR: list[str] = []


_ADPA_CACHE: list[str] = []


def _adpa_cache() -> str:
    """A top-8 cache of qwen25_adpa's two (random) teachers over the student's responses, for qwen25_adpa_cached."""
    import tempfile
    from pathlib import Path

    from kdrun.cache import write_cache
    from kdrun.config import validate

    if not _ADPA_CACHE:
        out = Path(tempfile.mkdtemp(prefix="kdrun-adpa-cache-")) / "teachers"
        torch.manual_seed(0)
        write_cache(validate(compose_cfg(smoke_overrides("qwen25_adpa"), recipe="qwen25_adpa")), "teacher", out, k=8,
                    mask_field="rejected_token_mask", reference="reference")
        _ADPA_CACHE.append(str(out))
    return _ADPA_CACHE[0]


def _teacher_cache() -> str:
    """A top-8 cache of text_quickstart's (random) teacher over its training split, for text_cached_kd."""
    import tempfile
    from pathlib import Path

    from kdrun.cache import write_cache
    from kdrun.config import validate

    if not _CACHE_DIR:
        out = Path(tempfile.mkdtemp(prefix="kdrun-cache-")) / "teacher"
        torch.manual_seed(0)
        write_cache(validate(compose_cfg(["trainer.device=cpu"], recipe="text_quickstart")), "teacher", out, k=8, calibrate=True)
        _CACHE_DIR.append(str(out))
    return _CACHE_DIR[0]


def smoke_overrides(recipe: str) -> list[str]:
    out = ["trainer.max_epochs=1", "trainer.max_steps_per_epoch=1", "trainer.progress=off", "trainer.tensorboard=false",
           "trainer.save_checkpoints=false", "trainer.device=cpu"]
    if recipe.startswith("cifar"):
        num_classes = 10 if recipe.startswith("cifar10_") else 100
        out += ["data=synthetic", f"data.num_classes={num_classes}", "data.batch_size=8", "data.eval_batch_size=8",
                "data.source.num_train=16", "data.source.num_test=8"]
    if recipe.startswith("imagenet"):  # timm models at their 224-pixel input on a few synthetic images
        out += ["data=synthetic", "data.num_classes=10", "data.input_shape=[3,224,224]", "data.batch_size=4",
                "data.eval_batch_size=4", "data.source.num_train=4", "data.source.num_test=4"]
    if recipe in ("text_cached_kd", "text_first_kd"):
        out += [f"data.teacher_cache={_teacher_cache()}"]
    if recipe == "qwen25_adpa_cached":
        out += [f"data.teacher_cache={_adpa_cache()}"]
    if recipe in HF_STANDINS:
        keep_teacher_tok = any(o.startswith("data.source.teacher_tokenizer=") for o in HF_STANDINS[recipe])
        has_teacher = compose_cfg(out, recipe=recipe).get("teacher") is not None
        out += [*(["teacher.net.path=null"] if has_teacher else []), TOKENIZER,
                *([] if keep_teacher_tok or not has_teacher else ["data.source.teacher_tokenizer=null"]),
                f"data.source.train={_text_file()}",
                "data.batch_size=4", "trainer.accumulate_grad_batches=1", *HF_STANDINS[recipe]]
        if compose_cfg(out, recipe=recipe).get("generation") is not None:
            out += ["generation.max_new_tokens=3", "++generation.seeds=[1]", "generation.max_examples=2"]
    cfg = compose_cfg(out, recipe=recipe)
    if cfg.get("teacher") is not None:
        out += ["teacher.checkpoint=null"]
    out += [f"models.{name}.checkpoint=null" for name in (cfg.get("models") or {})]
    if cfg.data.get("val_split"):
        out += ["data.val_split=4"]
    if cfg.data.get("meta_split"):
        out += ["data.meta_split=4"]
    # wiring, not learning: a small lr keeps random deep teachers' feature losses finite
    out += [f"stages.{name}.optimizer.lr=0.0001" for name in cfg.stages]
    return out


# ResNet-50's tap shapes with one bottleneck per stage
SHALLOW_NETS = {"resnet50": {"_target_": "kdrun.models.resnetv2.CifarBottleneckResNet", "blocks": [1, 1, 1, 1],
                             "num_classes": "${data.num_classes}"}}


def shallow_node(name: str):
    if name in SHALLOW_NETS:
        return OmegaConf.create({"name": name, "net": SHALLOW_NETS[name]})
    return model_node(name)


def model_node_real(name: str):
    return model_node(name)


def with_models(cfg, teacher: str | None, student: str, shallow: bool):
    """``cfg`` with other zoo models, as ``teacher=... student=...`` would select them."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    for key, name in (("teacher", teacher), ("student", student)):
        if name is None:
            continue
        node = shallow_node(SHALLOW.get(name, name)) if shallow else model_node_real(name)
        cfg[key].net = node.net
        cfg[key].name = name
    return cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_a_step_with_its_default_models(recipe, tmp_path):
    torch.manual_seed(0)
    cfg = validate(compose_cfg(smoke_overrides(recipe), recipe=recipe))
    summary = run(cfg, tmp_path)
    assert summary["steps"] >= 1
    # a model without class scores is judged by its linear probe (a projection head) or its monitors (a ranker)
    monitored = [st.get("monitor") for st in (summary.get("stages") or {}).values() if isinstance(st, dict)]
    assert summary["last_top1"] is not None or summary.get("probe_top1") is not None or any(monitored)
    if cfg.get("published") is not None:
        assert summary["published"]["top1"] > 0


CASES = [(r, t, s) for r in RECIPES for t, s in pairs(r)]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if pairs(r)])
def test_every_table_pair_resolves_its_settings_and_published_number(recipe):
    from kdrun.engine.summary import published_entry

    base = compose_cfg(smoke_overrides(recipe), recipe=recipe)
    for teacher, student in pairs(recipe):
        cfg = validate(with_models(base, teacher, student, shallow=False))
        entry = published_entry(cfg)
        assert entry is not None and entry["top1"] > 0, (teacher, student)
        main_lr = compose_cfg([f"student={student}"] + ([f"teacher={teacher}"] if teacher else []), recipe=recipe).stages.main.optimizer.lr
        if recipe.endswith("_nd"):  # the ND authors' scripts: 0.1, and 0.02 in their ShuffleNet examples
            assert main_lr == (0.02 if student.startswith("shufflenet") else 0.1), (teacher, student, main_lr)
            continue
        light = student in ("mobilenetv2", "shufflenetv1", "shufflenetv2")
        assert main_lr == (0.01 if light else 0.05), (teacher, student, main_lr)
        # every other stage's lr too (the init stages of FT, AB, FSP), by RepDistiller's helper/pretrain.py: 0.01
        # for factor transfer with a CIFAR ResNet/WRN student, else the student's main learning rate
        composed = compose_cfg([f"student={student}"] + ([f"teacher={teacher}"] if teacher else []), recipe=recipe)
        for name, stage in composed.stages.items():
            if name == "main" or stage.get("optimizer") is None or stage.optimizer.get("lr") is None:
                continue
            want = 0.01 if recipe == "cifar100_ft" and student.startswith(("resnet", "wrn")) else main_lr
            assert stage.optimizer.lr == want, (recipe, name, teacher, student, stage.optimizer.lr)


SHAPE_CASES = sorted({(r, SHALLOW.get(t, t) if t else None, SHALLOW.get(s, s)) for r, t, s in CASES},
                     key=lambda c: (c[0], str(c[1]), c[2]))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,teacher,student", SHAPE_CASES, ids=[f"{r}-{t}-{s}" for r, t, s in SHAPE_CASES])
def test_every_table_pair_trains_a_step(recipe, teacher, student, tmp_path):
    torch.manual_seed(0)
    cfg = validate(with_models(compose_cfg(smoke_overrides(recipe), recipe=recipe), teacher, student, shallow=True))
    summary = run(cfg, tmp_path)
    assert summary["steps"] >= 1


def test_every_recipe_documents_itself():
    for recipe in RECIPES:
        text = (recipe_dir() / f"{recipe}.yaml").read_text()
        assert text.startswith("# @package _global_\n#"), f"{recipe}: header comment missing"
        cfg = compose_cfg([], recipe=recipe)
        assert cfg.name == recipe and cfg.method, recipe
