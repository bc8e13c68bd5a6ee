"""The evaluation harness on a tiny random MoE: perplexity, local tasks, report, lm-eval offline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moepress.eval import EvalReport, evaluate
from moepress.eval.local_tasks import build_items, continuation_logprobs, score_items
from moepress.eval.loglikelihood import encode_requests, loglikelihoods, shares_context
from moepress.eval.perplexity import encode_text, perplexity, scoring_windows, unigram_perplexity
from moepress.zoo import builtin_domains, builtin_text, builtin_texts



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Mixtral saved with a small BPE tokenizer: (model, tokenizer, path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from moepress.zoo.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tiny")
    train_bpe([builtin_text(f"heldout:{d}")[:10_000] for d in builtin_domains()], vocab_size=320, out=path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model, tok, path


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 64, 64), (1000, 64, 16), (65, 64, 64), (64, 64, 1), (2, 8, 8)])
def test_windows_score_every_token_once(n, seq_len, stride):
    windows = scoring_windows(n, seq_len, stride)
    scored = [i for begin, end, first in windows for i in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - begin <= seq_len and begin < first for begin, end, first in windows)


def test_ppl_equals_direct_computation(tiny):
    model, tok, _ = tiny
    text = builtin_text("linux")[:2000]
    ids = encode_text(tok, text)
    # one window holding the whole text: the model's own shifted cross-entropy
    with torch.no_grad():
        direct = model(input_ids=ids[None], labels=ids[None]).loss.item()
    whole = perplexity(model, tok, text, seq_len=len(ids))
    assert whole["tokens"] == len(ids) - 1
    assert math.isclose(whole["ppl"], math.exp(direct), rel_tol=1e-4)
    # windows of 64 with stride 32: recompute each window's scored tokens by hand
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in scoring_windows(len(ids), 64, 32):
            logp = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0].double(), -1)
            for t in range(first, end):
                nll -= logp[t - begin - 1, ids[t]].item()
                count += 1
    windowed = perplexity(model, tok, text, seq_len=64, stride=32, batch_size=3)
    assert windowed["tokens"] == count and (windowed["seq_len"], windowed["stride"]) == (64, 32)
    assert math.isclose(windowed["ppl"], math.exp(nll / count), rel_tol=1e-4)
    # a random model is no better than the oracle unigram of the same tokens
    assert windowed["ppl"] > windowed["unigram_ppl"]


def test_unigram_perplexity():
    assert math.isclose(unigram_perplexity([1, 2, 3, 4] * 5), 4.0)
    assert math.isclose(unigram_perplexity([7] * 10), 1.0)


def _choice_logprobs_by_hand(model, tok, item, max_len):
    """Each choice scored alone (no padding): the summed log-probability of its tokens after the
    query's last `max_len - len(choice)` tokens."""
    scores = []
    for choice in item["choices"]:
        cont = tok(choice, add_special_tokens=False)["input_ids"][: max_len - 1]
        ctx = tok(item["query"], add_special_tokens=False)["input_ids"][-(max_len - len(cont)):]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
        scores.append(sum(logp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont)))
    return scores


def test_local_tasks_are_deterministic_and_scored(tiny):
    model, tok, _ = tiny
    texts = builtin_texts()
    items = build_items("next_chunk", texts, per_domain=3)
    assert items == build_items("local_mc", texts, per_domain=3)
    assert len(items) == 3 * len(texts) and {len(i["choices"]) for i in items} == {4}
    assert all(i["choices"][i["label"]] not in i["choices"][:i["label"]] for i in items)
    domain_items = build_items("domain_mc", texts, per_domain=2)
    assert {i["domain"] for i in domain_items} == set(texts)
    # 128 tokens: shorter than a query + continuation (~250 tokens), so contexts are truncated;
    # batches of 4 sequences of different lengths are padded.
    by_hand = [_choice_logprobs_by_hand(model, tok, item, 128) for item in items[:6]]
    pairs = [(item["query"], choice) for item in items[:6] for choice in item["choices"]]
    batched = continuation_logprobs(model, tok, pairs, max_len=128, batch_size=4)
    assert batched == pytest.approx(sum(by_hand, []), rel=1e-4)
    result = score_items(model, tok, items[:6], max_len=128, batch_size=4)
    hits = [max(range(4), key=scores.__getitem__) == item["label"] for scores, item in zip(by_hand, items)]
    assert result["n"] == 6 and result["acc"] == sum(hits) / 6
    with pytest.raises(ValueError, match="built-in"):
        build_items("hellaswag", texts)


def _reference_loglikelihoods(model, encoded):
    """The plain scorer: one unpadded forward per request, float64 log-softmax, a sum over its tokens."""
    scores = []
    with torch.no_grad():
        for ctx, cont in encoded:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
            scores.append(sum(logp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont)))
    return scores


def _ragged_requests(vocab: int, seed: int = 0):
    """Contexts of 1..40 tokens with 1..5 continuations of 1..12 tokens each (one context repeated
    with other continuations further on, one continuation shared by two contexts)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    encoded = []
    contexts = [rand(n) for n in (1, 40, 7, 23, 2, 31)]
    for i, ctx in enumerate(contexts):
        for _ in range(1 + i % 5):
            encoded.append((ctx, rand(int(torch.randint(1, 13, (1,), generator=gen)))))
    encoded.append((contexts[1], rand(5)))  # the same context again, not next to its group
    encoded.append((contexts[3], encoded[0][1]))
    return encoded


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_batched_scorer_equals_one_forward_per_request(tiny, shared, pad_side):
    """Padding (either side), position ids, the shared-context mask, kept logits and the gather: the
    batched scores equal one unpadded forward per request."""
    model, tok, _ = tiny
    encoded = _ragged_requests(len(tok))
    reference = _reference_loglikelihoods(model, encoded)
    for batch_size in (1, 3, 64):
        batched = loglikelihoods(model, encoded, max_len=64, batch_size=batch_size, shared=shared, pad_side=pad_side)
        assert batched.dtype == torch.float64 and batched.shape == (len(encoded),)
        assert batched.tolist() == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_batched_scorer_other_families(family):
    """The 4-D shared-context mask as each family's attention reads it (gpt-oss: eager with sinks)."""
    from moepress.testing import tiny_model

    model = tiny_model(family)
    assert shares_context(model, 64)
    encoded = _ragged_requests(model.config.vocab_size, seed=1)
    reference = _reference_loglikelihoods(model, encoded)
    batched = loglikelihoods(model, encoded, max_len=64, batch_size=4)
    assert batched.tolist() == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_shares_context_only_where_a_4d_mask_is_exact(tiny):
    from moepress.testing import tiny_config, tiny_model

    model, _, _ = tiny
    assert model.config._attn_implementation in ("sdpa", "eager") and shares_context(model, 256)
    # a sliding window shorter than a request: every request in its own row, the model masks itself
    windowed = tiny_model("mixtral", sliding_window=8)
    assert not shares_context(windowed, 64) and shares_context(windowed, 8)
    encoded = _ragged_requests(windowed.config.vocab_size, seed=2)
    assert loglikelihoods(windowed, encoded, max_len=64, batch_size=4).tolist() == pytest.approx(
        _reference_loglikelihoods(windowed, encoded), rel=1e-5, abs=1e-6)
    # per-layer kinds: the window matters only on sliding layers
    config = tiny_config("gpt_oss", sliding_window=16)
    config._attn_implementation = "eager"  # what a loaded gpt-oss runs
    assert set(config.layer_types) == {"full_attention"}
    fake = lambda config: type("M", (), {"config": config})()  # noqa: E731
    assert shares_context(fake(config), 64)
    config.layer_types = ["sliding_attention", "full_attention"]
    assert not shares_context(fake(config), 64) and shares_context(fake(config), 16)
    config._attn_implementation = "flash_attention_2"  # takes no 4-D mask
    assert not shares_context(fake(config), 16)


def test_eager_attention_reads_the_additive_mask(tiny):
    model, tok, _ = tiny
    encoded = _ragged_requests(len(tok), seed=3)
    reference = _reference_loglikelihoods(model, encoded)
    model.set_attn_implementation("eager")
    try:
        batched = loglikelihoods(model, encoded, max_len=64, batch_size=4, shared=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert batched.tolist() == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_items_take_one_forward_per_row_and_report_progress(tiny):
    """The 4 choices of an item share one row (its context is not truncated under max_len=1024):
    ceil(items / batch_size) forwards; progress counts every request once, after each forward."""
    model, tok, _ = tiny
    items = build_items("next_chunk", builtin_texts(), per_domain=2)  # 12 items, 48 requests
    forwards, calls = [], []
    hook = model.register_forward_hook(lambda module, args, out: forwards.append(1))
    try:
        result = score_items(model, tok, items, max_len=1024, batch_size=5,
                             progress=lambda n, total: calls.append((n, total)))
    finally:
        hook.remove()
    assert len(forwards) == math.ceil(len(items) / 5) == len(calls)
    assert sum(n for n, _ in calls) == 4 * len(items) and {total for _, total in calls} == {4 * len(items)}
    # the same accuracies as scoring each request alone
    pairs = [(item["query"], choice) for item in items for choice in item["choices"]]
    alone = torch.tensor(_reference_loglikelihoods(model, encode_requests(tok, pairs, 1024))).view(-1, 4)
    labels = torch.tensor([item["label"] for item in items])
    assert result["acc"] == int((alone.argmax(1) == labels).sum()) / len(items)


def test_truncation_and_empty_context(tiny):
    _, tok, _ = tiny
    (ctx, cont), = encode_requests(tok, [("a b c d e f g h i j", "k l m n o p")], max_len=8)
    whole = tok("a b c d e f g h i j", add_special_tokens=False)["input_ids"]
    assert len(ctx) + len(cont) <= 8 and ctx == whole[-len(ctx):]
    (ctx, cont), = encode_requests(tok, [("a", "b " * 50)], max_len=8)
    assert len(cont) == 7 and len(ctx) == 1  # the continuation keeps max_len - 1 tokens
    with pytest.raises(ValueError, match="empty context"):
        encode_requests(tok, [("", "text")], max_len=8)


def test_evaluate_shows_a_bar_per_task(tiny, capsys):
    model, tok, _ = tiny
    evaluate(model, tok, ppl=["linux"], tasks="next_chunk", seq_len=64, mc_per_domain=1, progress=True)
    err = capsys.readouterr().err
    assert "next_chunk" in err and "requests" in err and "ppl/heldout:linux" in err and "windows" in err


def test_evaluate_report_and_baseline(tiny, tmp_path):
    model, tok, path = tiny
    small = tmp_path / "small.txt"
    small.write_text(builtin_text("linux")[:4000])
    report = evaluate(model, tok, ppl=[str(small), "french"], tasks="next_chunk", seq_len=64, mc_per_domain=2,
                      baseline=str(path))
    assert isinstance(report, EvalReport)
    assert report.settings["seq_len"] == 64 and report.settings["stride"] == 64
    assert {"ppl/small.txt", "ppl/heldout:french", "next_chunk/acc", "params/total"} <= set(report.metrics)
    assert report.metrics["params/total"] == sum(p.numel() for p in model.parameters())
    # the same weights loaded from disk: everything retained at 100 %
    assert all(math.isclose(v, 100.0, rel_tol=1e-6) for v in report.retained.values())
    saved = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert "retained_percent" in saved and saved["baseline"]["model"] == str(path)
    assert "ppl/heldout:french" in str(report)
    with pytest.raises(ValueError, match="built-in"):
        evaluate(model, tok, ppl=["no-such-file.txt"])


def test_speed_is_tokens_over_the_best_run(tiny, monkeypatch):
    """With a scripted clock: prefill runs take 3, 2, 5 s and decode runs 4, 1, 8 s."""
    from types import SimpleNamespace

    from moepress.eval import measure

    ticks = iter([0, 3, 10, 12, 20, 25, 30, 34, 40, 41, 50, 58])
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    model, tok, _ = tiny
    speed = measure.throughput(model, len(tok), prompt_len=16, batch_size=2, new_tokens=4, repeats=3)
    assert speed["prefill_tok_s"] == 2 * 16 / 2 and speed["decode_tok_s"] == 2 * 4 / 1
    assert next(ticks, None) is None  # every run was timed, nothing else


def test_speed_measurement(tiny):
    model, tok, _ = tiny
    report = evaluate(model, tok, speed=True, seq_len=32)
    assert report.details["speed"]["prompt_len"] == 32
    # one forward over 32 prompt tokens beats 32 single-token decode forwards, on any machine
    assert report.metrics["speed/prefill_tok_s"] > report.metrics["speed/decode_tok_s"] > 0


def test_lm_eval_local_task_offline(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    model, tok, _ = tiny
    report = evaluate(model, tok, tasks=["moepress_next_chunk"], lm_eval_limit=8)
    # lm-eval scores the first 8 items of the local next_chunk task (per_domain=16, seed 0) the same way
    items = build_items("next_chunk", builtin_texts(), per_domain=16)[:8]
    local = score_items(model, tok, items, max_len=4096)
    assert report.metrics["lm_eval:moepress_next_chunk/acc"] == local["acc"]
