"""The reference zoo: splits, cleaning, tokenizer, a short training run, the committed model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from moepress.zoo import builtin_domains, builtin_text, reference_model_path
from moepress.zoo.corpus import split_of
from moepress.zoo.text_cleaning import clean_rst, is_prose, looks_french, parse_foldoc



@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from moepress.zoo.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    texts = [builtin_text(f"heldout:{d}")[:20_000] for d in builtin_domains()]
    train_bpe(texts, vocab_size=384, out=out)
    return out


def test_builtin_texts_ship_every_domain():
    assert {"linux", "python_docs", "foldoc", "code", "french", "handbook"} <= set(builtin_domains())
    assert len(builtin_text("calib")) > 100_000
    assert builtin_text("linux") == builtin_text("heldout:linux")
    with pytest.raises(ValueError, match="available"):
        builtin_text("heldout:klingon")


def test_splits_are_deterministic_and_proportioned():
    ids = [f"doc-{i}" for i in range(20_000)]
    first = [split_of("linux", i) for i in ids]
    assert first == [split_of("linux", i) for i in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "calib", "heldout")}
    assert abs(share["train"] - 0.90) < 0.01 and abs(share["calib"] - 0.05) < 0.01
    # the domain is part of the key: the same id may land elsewhere in another domain
    assert [split_of("code", i) for i in ids[:200]] != first[:200]


def test_cleaning_rules():
    rst = "Title\n=====\n\nSee :func:`os.path.join` and ``x = 1`` in `the docs <http://x>`_ now.\n\n.. note::\n\n   hidden\n"
    assert clean_rst(rst) == ["Title", "See os.path.join and x = 1 in the docs now."]
    assert is_prose("This is a sentence that has more than eight plain words in it.")
    assert not is_prose("x = f(a, b) + g[3] * 2 ** 7 // 5 - 1 ; y")
    foldoc = "ADT\n\n   <programming> A kind of {data abstraction} (see\n   {Reynolds (http://x.org)}).\n\n   (2003-07-03)\n\n"
    assert parse_foldoc(foldoc) == [("ADT", "ADT\n\n(programming) A kind of data abstraction (see Reynolds).")]
    assert looks_french("Le paquet est installé dans le système pour les utilisateurs.")
    assert not looks_french("The package is installed in the system for the users.")


def test_tokenizer_round_trip(small_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    text = "Le noyau Linux: def f(x):\n    return x ** 2  # café ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == 384 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"


def test_short_training_run_lowers_loss(tmp_path, small_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moepress.zoo.recipes import TrainRecipe
    from moepress.zoo.train import train_model

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    streams = {d: np.asarray(tok(builtin_text(d)[:30_000], add_special_tokens=False)["input_ids"], dtype=np.uint16)
               for d in ("linux", "code")}
    recipe = TrainRecipe(
        name="tiny", config_class="MixtralConfig", steps=40, batch_size=4, seq_len=64, lr=1e-2, warmup=5,
        config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=True, router_aux_loss_coef=0.02),
    )
    _, log = train_model(recipe, tmp_path / "tiny", streams, tokenizer=tok, checkpoint_every=20, log=lambda s: None)
    losses = [h["loss"] for h in log["history"]]
    assert losses[-1] < 0.8 * 6.0  # ln(384) = 5.95 at initialisation
    saved = json.loads((tmp_path / "tiny" / "train_log.json").read_text())
    assert saved["steps"] == 40 and not (tmp_path / "tiny.partial").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").config.num_local_experts == 4


def test_training_is_deterministic_across_resume(tmp_path, small_tokenizer):
    from transformers import AutoTokenizer

    from moepress.zoo.recipes import TrainRecipe
    from moepress.zoo.train import train_model

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    streams = {"linux": np.asarray(tok(builtin_text("linux")[:20_000], add_special_tokens=False)["input_ids"], dtype=np.uint16)}
    recipe = TrainRecipe(
        name="tiny", config_class="OlmoeConfig", steps=10, batch_size=2, seq_len=32, warmup=2,
        config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    )
    full, _ = train_model(recipe, tmp_path / "a", streams, log=lambda s: None)
    # a run interrupted after step 4 (checkpoint) and then resumed reproduces the uninterrupted one
    assert train_model(recipe, tmp_path / "b", streams, stop_after=4, log=lambda s: None) == (None, None)
    assert (tmp_path / "b.partial" / "ckpt.pt").exists() and not (tmp_path / "b").exists()
    resumed, _ = train_model(recipe, tmp_path / "b", streams, log=lambda s: None)
    a = dict(full.named_parameters())
    b = dict(resumed.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_model_path_errors_clearly(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="known"):
        reference_model_path("gpt-17")
    import moepress.zoo as zoo

    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "ASSETS_DIR", tmp_path / "no-assets")
    with pytest.raises(FileNotFoundError, match="make zoo"):
        reference_model_path("deepseek-ref")


def test_committed_mixtral_ref_beats_unigram(monkeypatch, tmp_path):
    import moepress.zoo as zoo
    from moepress.eval.perplexity import perplexity

    asset = zoo.ASSETS_DIR / "mixtral-ref"
    assert (asset / "model.safetensors").exists(), "the committed mixtral-ref asset is missing (moepress zoo train mixtral-ref)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (asset / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    from moepress.loading import config_dtype, stored_dtype

    assert stored_dtype(asset) == config_dtype(asset) == torch.float16  # the config says what the file holds
    model = AutoModelForCausalLM.from_pretrained(asset, dtype=torch.float32)  # CPU work: upcast (moepress.load does)
    tok = AutoTokenizer.from_pretrained(asset)
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    assert next(model.parameters()).dtype == torch.float32
    for domain in ("linux", "handbook"):
        result = perplexity(model, tok, builtin_text(domain)[:8_000], seq_len=256)
        assert result["ppl"] < 0.7 * result["unigram_ppl"], (domain, result)


@pytest.mark.parametrize("name", ["qwen3-ref", "olmoe-wide"])
def test_stronger_reference_recipes_meet_issue_13(name):
    """The stronger references are hidden >= 256, >= 8 MoE layers, >= 16 experts, >= 20 M parameters,
    and olmoe-wide keeps OLMoE's top-8 unrenormalised routing (the Compressed Experts paper's setting)."""
    import transformers

    from moepress.arch import moe_layer_views
    from moepress.zoo.recipes import build_config, get_recipe

    recipe = get_recipe(name)
    config = build_config(recipe)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    views = moe_layer_views(model)
    assert config.hidden_size >= 256 and len(views) >= 8
    assert min(v.num_experts for v in views) >= 16
    assert sum(p.numel() for p in model.parameters()) >= 20_000_000
    assert recipe.steps >= 1000
    if name == "olmoe-wide":
        assert config.num_experts_per_tok == 8 and config.norm_topk_prob is False
