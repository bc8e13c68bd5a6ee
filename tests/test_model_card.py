"""Every output folder carries a model card (`README.md`) read from its record (issue 20)."""

from __future__ import annotations

import json

import moepress
from moepress.model_card import model_card


def test_a_stock_and_a_custom_output_each_get_a_card_from_their_record(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    for method, export in (("reap", "stock"), ("d2moe", "custom")):
        out = moepress.compress(src, method, 0.5, calib=calib_file, samples=4, seq_len=24).save(tmp_path / method)
        card = (out / "README.md").read_text()
        record = json.loads((out / "moepress.json").read_text())
        assert record["export"] == export
        after = record["parameters"]["after"]
        assert f"| stored, total | {record['parameters']['before']['total']:,} | {after['total']:,} |" in card
        assert f"{after['active_per_token']:,}" in card
        assert f"--method {method}" in card and str(src) in card
        assert ("trust_remote_code=True" in card) == (export == "custom")
        assert f"vllm serve {method}" in card
    # D²-MoE records its activation errors per projection: the card shows each layer's worst
    assert "relative_activation_error, mean over 2 layers" in card


def test_the_card_states_quantization_fine_tuning_and_a_dtype_disagreement():
    record = {"method": "quantize", "quantized_from": "owner/model", "source_model": "owner/model",
              "export": "custom", "family": "qwen3_moe", "dtype": "bfloat16",
              "source_dtype_note": "the source's weights are stored in bfloat16 while its config.json says float32",
              "quantization": {"scheme": "int8", "granularity": "per channel", "expert_bytes_before": 1000,
                               "expert_bytes_after": 510},
              "finetune": {"steps": 20, "epochs": 2.5, "val_loss": 3.25},
              "layers": {"0": {"rel_error": 0.5}, "1": {"rel_error": 0.25}}}
    card = model_card(record, "out")
    assert "base_model: owner/model" in card
    assert "expert bytes 1,000 -> 510" in card and '"val_loss": 3.25' in card
    assert "config.json says float32" in card
    assert "rel_error, mean over 2 layers: 0.375 (worst 0.5)" in card
