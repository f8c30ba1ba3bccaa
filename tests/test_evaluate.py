"""adpo-eval: metrics against hand-computed values, log-probs identical to the trainer's path, adapters, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adpo.cli.evaluate import main
from adpo.collator import RESPONSE_MASK, ROW_IDS, ADPOCollator, collator_from_args
from adpo.config import LoadArguments, RowArguments
from adpo.data import load_adpo_dataset
from adpo.evaluate import derive, load_for_eval, score_rows, summarise
from adpo.logprobs import response_logps


def test_metrics_equal_hand_computed_values():
    """Four rows, β = 0.5.

    margins Δ = c − r:          2, −1, 0, 0.5  → prompt accuracy (1 + 0 + ½ + 1)/4 = 0.625; strict 2/4; ties 1/4
    rewards β(π − ref):  chosen  0.5·(−1+3)=1, 0.5·(−5+4)=−0.5, 0.5·(−2+2)=0, 0.5·(−1.5+1)=−0.25
                         rejected 0.5·(−3+3)=0, 0.5·(−4+4)=0,   0.5·(−2+2)=0, 0.5·(−2+1)=−0.5
      margins 1, −0.5, 0, 0.25 → reward accuracy 2/4 (a zero margin is not > 0); mean margin 0.75/4 = 0.1875
    image gaps (with − without): chosen −1+3=2, −5+6=1, −2+2=0, −1.5+2=0.5 → mean 0.875;
                                 rejected −3+3=0, −4+4=0, −2+1=−1, −2+2=0 → mean −0.25
    groups: a = rows 0, 1 → accuracy 0.5; b = rows 2, 3 → accuracy 0.75
    """
    logps = [(-1.0, -3.0), (-5.0, -4.0), (-2.0, -2.0), (-1.5, -2.0)]
    refs = [(-3.0, -3.0), (-4.0, -4.0), (-2.0, -2.0), (-1.0, -1.0)]
    blind = [(-3.0, -3.0), (-6.0, -4.0), (-2.0, -1.0), (-2.0, -2.0)]
    records = [
        derive({"row": i, "g": "ab"[i // 2], "logp_chosen": c, "logp_rejected": r, "ref_logp_chosen": rc,
                "ref_logp_rejected": rr, "noimage_logp_chosen": bc, "noimage_logp_rejected": br}, beta=0.5)
        for i, ((c, r), (rc, rr), (bc, br)) in enumerate(zip(logps, refs, blind, strict=True))
    ]
    s = summarise(records, group_by=["g"])
    assert s["n"] == 4
    assert s["prompt_accuracy"] == 0.625
    assert s["prompt_accuracy_strict"] == 0.5
    assert s["ties"] == 0.25
    assert s["logp_margin"] == pytest.approx((2 - 1 + 0 + 0.5) / 4)
    assert [r["reward_margin"] for r in records] == pytest.approx([1.0, -0.5, 0.0, 0.25])
    assert s["reward_accuracy"] == 0.5
    assert s["reward_margin"] == pytest.approx(0.1875)
    assert s["reward_chosen"] == pytest.approx((1 - 0.5 + 0 - 0.25) / 4)
    assert s["reward_rejected"] == pytest.approx(-0.5 / 4)
    assert s["image_ablation_gap"] == pytest.approx((2 + 1 + 0 + 0.5) / 4)
    assert s["image_ablation_gap_rejected"] == pytest.approx((0 + 0 - 1 + 0) / 4)
    assert s["groups"]["g"]["a"]["prompt_accuracy"] == 0.5 and s["groups"]["g"]["a"]["n"] == 2
    assert s["groups"]["g"]["b"]["prompt_accuracy"] == 0.75


def test_metrics_without_reference_or_images_skip_those_keys():
    s = summarise([derive({"row": 0, "logp_chosen": -1.0, "logp_rejected": -2.0}, beta=0.1)])
    assert s["prompt_accuracy"] == 1.0
    assert "reward_accuracy" not in s and "image_ablation_gap" not in s


def direct_logps(model, processor, rows, multimodal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's path: ADPOCollator → response_logps, chosen/rejected halves."""
    batch = ADPOCollator(processor, multimodal=multimodal)(rows)
    mask = batch.pop(RESPONSE_MASK)
    batch.pop(ROW_IDS)
    with torch.no_grad():
        return response_logps(model, model.get_output_embeddings(), batch, mask).sums.chunk(2)


def load(path: Path, ref: Path | None = None):
    return load_for_eval(LoadArguments(model_name_or_path=str(path), ref_model_name_or_path=ref and str(ref)))


def collators(loaded, multimodal: bool) -> dict[str, ADPOCollator | None]:
    """score_rows' collators as adpo-eval builds them (default flags), with image ablation when multimodal."""
    blind = collator_from_args(loaded.processor, RowArguments(), multimodal=False) if multimodal else None
    return {"collator": collator_from_args(loaded.processor, RowArguments(), multimodal=multimodal),
            "text_collator": blind}


def test_score_rows_uses_the_trainers_log_probs(tiny_idefics3: Path, image_jsonl: Path):
    loaded = load(tiny_idefics3, ref=tiny_idefics3)
    dataset = load_adpo_dataset(str(image_jsonl), max_samples=5)
    records = score_rows(loaded, dataset, **collators(loaded, True), batch_size=2)  # batches of 2, 2, 1
    rows = [dataset[i] for i in range(5)]
    chosen, rejected = direct_logps(loaded.model, loaded.processor, rows, multimodal=True)
    blind_c, blind_r = direct_logps(loaded.model, loaded.processor, rows, multimodal=False)
    assert [r["row"] for r in records] == list(range(5))
    # Same rows, different batch composition: equal up to float reassociation.
    torch.testing.assert_close(torch.tensor([r["logp_chosen"] for r in records]), chosen)
    torch.testing.assert_close(torch.tensor([r["logp_rejected"] for r in records]), rejected)
    torch.testing.assert_close(torch.tensor([r["noimage_logp_chosen"] for r in records]), blind_c)
    torch.testing.assert_close(torch.tensor([r["noimage_logp_rejected"] for r in records]), blind_r)
    assert len({round(r["logp_margin"], 6) for r in records}) > 1  # the images matter to the model
    # The reference is the same weights: every reward is exactly zero, so reward accuracy is 0.
    assert all(r["reward_margin"] == 0 for r in records)
    assert summarise(records)["reward_accuracy"] == 0.0


def test_text_only_evaluation_of_image_counterfactuals_is_a_tie(tiny_idefics3: Path, image_jsonl: Path):
    """Image counterfactuals share the question: without images both prompts are the same text."""
    loaded = load(tiny_idefics3)
    dataset = load_adpo_dataset(str(image_jsonl), max_samples=4)
    records = score_rows(loaded, dataset, **collators(loaded, False), batch_size=4)
    s = summarise(records)
    assert s["ties"] == 1.0 and s["prompt_accuracy"] == 0.5 and s["prompt_accuracy_strict"] == 0.0
    assert "image_ablation_gap" not in s and "reward_accuracy" not in s


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny Llama with non-zero B matrices (so adapters on ≠ off), saved like adpo-train."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def test_adapter_reference_is_the_base_model(llama_adapter: Path, tiny_llama: Path, text_jsonl: Path):
    loaded = load(llama_adapter)
    assert loaded.adapter_reference and loaded.ref_model is None
    dataset = load_adpo_dataset(str(text_jsonl), max_samples=4)
    records = score_rows(loaded, dataset, **collators(loaded, False), batch_size=4)
    base = load(tiny_llama)
    rows = [dataset[i] for i in range(4)]
    base_c, base_r = direct_logps(base.model, base.processor, rows, multimodal=False)
    policy_c, _ = direct_logps(loaded.model, loaded.processor, rows, multimodal=False)
    torch.testing.assert_close(torch.tensor([r["ref_logp_chosen"] for r in records]), base_c)
    torch.testing.assert_close(torch.tensor([r["ref_logp_rejected"] for r in records]), base_r)
    torch.testing.assert_close(torch.tensor([r["logp_chosen"] for r in records]), policy_c)
    assert not torch.allclose(policy_c, base_c)  # the adapter changes the model


def test_cli_compare_writes_csv_json_and_plot(tiny_idefics3: Path, image_jsonl: Path, tmp_path: Path, capsys):
    out = tmp_path / "eval"
    assert main([
        "--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl), "--max_eval_samples", "3",
        "--compare", str(tiny_idefics3), "--compare_multimodal_mode", "false", "--ref_model_name_or_path",
        str(tiny_idefics3), "--label", "vlm", "--compare_label", "blind", "--output_dir", str(out),
        "--batch_size", "3",
    ]) == 0
    report = json.loads((out / "summary.json").read_text())
    vlm, blind = report["models"]["vlm"], report["models"]["blind"]
    assert vlm["multimodal"] is True and blind["multimodal"] is False
    assert vlm["n"] == blind["n"] == 3
    assert blind["prompt_accuracy"] == 0.5 and "image_ablation_gap" in vlm
    lines = (out / "rows.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[1].startswith("vlm,0,") and lines[4].startswith("blind,0,")
    assert (out / "evaluation.png").stat().st_size > 0
    assert "prompt_accuracy" in capsys.readouterr().out


def test_unknown_group_column_is_a_clear_error(tiny_idefics3: Path, image_jsonl: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="--group_by: the dataset has no column 'colour'"):
        main(["--model_name_or_path", str(tiny_idefics3), "--dataset_name", str(image_jsonl),
              "--group_by", "colour", "--output_dir", str(tmp_path)])

