"""`finetune` tells its user what it does (issue 20): the run's size up front, a warning when the
text is too small for the steps, a held-out validation loss, and no state folder after success."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moepress.arch import moe_layer_views, set_moe_block
from moepress.testing import tiny_model
from moepress.methods.compressed_experts.finetune import (
    FinetuneConfig, FinetuneError, FinetuneWarning, finetune, finetune_record, load_state, plot_losses, validation_loss,
)
from moepress.modeling.moepress_compressed import CompressedExpertsBlock


def _compressed_tiny():
    model = tiny_model("olmoe", seed=0, num_experts_per_tok=4)
    for view in moe_layer_views(model):
        set_moe_block(model, view.layer_index, CompressedExpertsBlock(view.block, model.config, k_main=2))
    return model


def _ids(n=20, seq=16):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(0))


def test_the_run_states_sequences_steps_and_epochs_before_the_first_step():
    messages = []
    result = finetune(_compressed_tiny(), _ids(20), FinetuneConfig(recipe="vectors", steps=3, batch_size=4), progress=False,
                      log=messages.append)
    assert messages == ["finetune: 18 training sequences of 16 tokens (+2 held out for validation); "
                        "3 steps of batch 4 = 0.7 epochs"]
    assert (result.plan.train_sequences, result.plan.validation_sequences, result.plan.steps) == (18, 2, 3)


def test_a_text_too_small_for_the_steps_warns_and_says_what_fits():
    with pytest.warns(FinetuneWarning, match=r"only 9 training sequences.*pass over it 5\.3 times.*\(9 steps = 4 epochs\)"):
        result = finetune(_compressed_tiny(), _ids(10), FinetuneConfig(recipe="vectors", steps=12, batch_size=4), progress=False)
    assert "warning" in finetune_record(FinetuneConfig(recipe="vectors", steps=12, batch_size=4), result, "text")
    messages = []
    finetune(_compressed_tiny(), _ids(10), FinetuneConfig(recipe="vectors", steps=12, batch_size=4), progress=False, log=messages.append)
    assert len(messages) == 2 and messages[1].startswith("warning: the text gives only 9 training sequences")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FinetuneWarning)  # 4 epochs exactly: quiet
        finetune(_compressed_tiny(), _ids(10), FinetuneConfig(recipe="vectors", steps=9, batch_size=4), progress=False)


def test_held_out_sequences_never_train_and_their_loss_is_measured():
    ids = _ids(20)
    cfg = FinetuneConfig(recipe="vectors", steps=4, batch_size=4, lr=5e-2, eval_every=2)
    split = _compressed_tiny()
    result = finetune(split, ids, cfg, progress=False)
    alone = _compressed_tiny()  # the same run on the 18 training sequences only, nothing held out
    finetune(alone, ids[:18], FinetuneConfig(recipe="vectors", steps=4, batch_size=4, lr=5e-2, holdout=0.0), progress=False)
    for (name, a), (_, b) in zip(split.named_parameters(), alone.named_parameters()):
        assert torch.equal(a, b), name
    assert [s for s, _ in result.validation] == [0, 2, 4]
    assert result.validation[-1][1] == pytest.approx(validation_loss(split, None, ids[18:], cfg))
    assert result.validation[-1][1] < result.validation[0][1]
    record = finetune_record(cfg, result, "text")
    assert (record["train_sequences"], record["validation_sequences"], len(record["validation"])) == (18, 2, 3)
    one = finetune(_compressed_tiny(), _ids(1), FinetuneConfig(steps=1, batch_size=1), progress=False)
    assert one.validation == [] and one.plan.validation_sequences == 0  # one sequence: it trains
    assert FinetuneConfig().held_out(4096) == 64 and FinetuneConfig().held_out(20) == 2


def test_the_progress_bar_and_the_plot_show_the_validation_loss(tmp_path, capsys):
    result = finetune(_compressed_tiny(), _ids(10), FinetuneConfig(recipe="vectors", steps=2, batch_size=4), progress=True)
    err = capsys.readouterr().err
    assert "finetune: 9 training sequences" in err and f"val {result.validation[-1][1]:.4f}" in err
    plain = plot_losses(result.losses, tmp_path / "plain.png").read_bytes()
    with_val = plot_losses(result.losses, tmp_path / "val.png", validation=result.validation).read_bytes()
    assert with_val[:4] == b"\x89PNG" and with_val != plain


def test_no_state_folder_after_success_and_a_resumable_one_after_an_interrupt(tmp_path):
    ids = _ids(20)
    cfg = FinetuneConfig(steps=4, batch_size=4, lr=1e-2, save_every=1)
    straight = _compressed_tiny()
    full = finetune(straight, ids, cfg, state_dir=tmp_path / "ok.state", progress=False)
    assert not (tmp_path / "ok.state").exists()

    killed = _compressed_tiny()
    calls = {"n": 0}

    def interrupt_third_training_step(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

    hook = killed.register_forward_pre_hook(interrupt_third_training_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, ids, FinetuneConfig(steps=4, batch_size=4, lr=1e-2), state_dir=tmp_path / "k.state",
                 progress=False)  # no save_every: the interrupt itself saves the last finished step
    hook.remove()
    assert load_state(tmp_path / "k.state")["step"] == 2
    resumed_model = _compressed_tiny()
    resumed = finetune(resumed_model, ids, FinetuneConfig(steps=4, batch_size=4, lr=1e-2),
                       state_dir=tmp_path / "k.state", resume=True, progress=False)
    assert resumed.losses == full.losses and resumed.validation == full.validation
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "k.state").exists()


def test_finetune_checkpoint_leaves_no_state_folder_and_records_the_split(tiny_checkpoint, calib_file, tmp_path):
    from moepress.api import compress, finetune_checkpoint

    ce = tmp_path / "ce"
    compress(str(tiny_checkpoint("olmoe")), method="compressed_experts", ratio=0.5).save(ce)
    out = tmp_path / "ce-ft"
    path = finetune_checkpoint(ce, calib_file, out, FinetuneConfig(steps=2, batch_size=2), samples=6, seq_len=32,
                               progress=False)
    assert not out.with_name(out.name + ".state").exists() and (path / "loss.png").exists()
    record = json.loads((path / "moepress.json").read_text())["finetune"]
    assert record["validation_sequences"] == 1 and len(record["validation"]) == 3


def test_distill_trains_on_sequences_sampled_from_the_original_model_too():
    ids = _ids(10)
    result = finetune(_compressed_tiny(), ids, FinetuneConfig(steps=1, batch_size=2, generated=6), progress=False)
    assert (result.plan.train_sequences, result.plan.validation_sequences, result.plan.generated) == (9 + 6, 1, 6)
    assert "6 of them sampled from the original model" in result.plan.line()
    assert FinetuneConfig().generated == 128 and FinetuneConfig(recipe="vectors").generated == 0
    assert finetune_record(FinetuneConfig(generated=6), result, "text")["config"]["generated"] == 6
    with pytest.raises(FinetuneError, match="generated must be >= 0"):
        FinetuneConfig(generated=-1)
