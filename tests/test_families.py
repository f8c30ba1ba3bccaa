"""Every model family through the same CLI, collator and trainer, on tiny random models loaded with from_pretrained.

Per family: a training step through the CLI (full and LoRA), the trainer's per-row log-probs against a plain
per-example forward pass, save and reload, LoRA by component name with gradients inside the vision tower under
gradient checkpointing, --freeze_*, and the image flags.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from adpo.cli import main
from adpo.collator import SEQUENCE_KEYS, ADPOCollator
from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.data import ROW_ID
from adpo.logprobs import choose_lm_head, response_logps
from adpo.modeling import (
    COMPONENTS,
    apply_lora,
    component_modules,
    component_path,
    component_paths,
    freeze_components,
    load_model_and_processor,
    load_processor_for,
    lora_adaptable,
    lora_adaptable_conv,
    lora_targets,
    not_lora_adaptable,
)
from adpo.pipeline import build_trainer
from adpo.synthetic import draw_shape, write_jsonl
from adpo.testing.tiny import FAMILIES, TORCHVISION_FAMILIES, build_tiny

REPO = Path(__file__).resolve().parents[1]


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # torchvision built for another torch fails with RuntimeError/OSError, not only ImportError
        return False
    return True


_NEEDS_TORCHVISION = pytest.mark.skipif(
    not (_imports("torchvision") and _imports("timm")),
    reason="these families' processors (or Gemma 3n's timm tower) need torchvision + timm: make test-torchvision",
)
# The per-family checks (training, log-probs, checkpointing, save/reload, processor reload) run on every family;
# the torchvision-only ones are skipped, with the reason above, where torchvision does not import.
ALL_FAMILIES = [*FAMILIES, *(pytest.param(family, marks=_NEEDS_TORCHVISION) for family in TORCHVISION_FAMILIES)]


def _image(shape: str, colour: str, width: int, height: int) -> Image.Image:
    return draw_shape(shape, colour, 32).resize((width, height))


# Rows of different lengths whose sides carry different numbers of images of different aspect ratios.
ROWS = [
    {"response": "A red circle.", "chosen": "What is shown?",
     "chosen_images": [_image("circle", "red", 32, 32)],
     "rejected": "What is shown in this image?",
     "rejected_images": [_image("circle", "green", 40, 24), _image("square", "blue", 24, 40)]},
    {"response": "There are two green triangles and one yellow star.", "chosen": "Describe the image in one sentence.",
     "chosen_images": [_image("triangle", "green", 20, 36), _image("circle", "red", 32, 32),
                       _image("square", "yellow", 48, 20)],
     "rejected": "Describe.", "rejected_images": [_image("triangle", "blue", 32, 32)]},
    {"response": "The shape is a blue square.", "chosen": "What colour is the shape in the picture?",
     "chosen_images": [_image("square", "blue", 36, 28)],
     "rejected": "What colour is the shape in the picture?", "rejected_images": [_image("square", "red", 36, 28)]},
    {"response": "Three.", "chosen": "Question: how many shapes are there?",
     "chosen_images": [_image("circle", "yellow", 30, 30), _image("circle", "blue", 30, 30)],
     "rejected": "Question: how many shapes are there? Answer:",
     "rejected_images": [_image("square", "green", 28, 36), _image("triangle", "red", 28, 36)]},
]



@pytest.fixture(scope="session")
def mixed_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`ROWS` as JSONL + PNG files."""
    return write_jsonl(ROWS, tmp_path_factory.mktemp("mixed_rows"))


def _rows() -> list[dict[str, Any]]:
    return [{**row, ROW_ID: i} for i, row in enumerate(ROWS)]


def _cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The seed's "Basic Training Command", shortened to one step of two pairs."""
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--max_steps", "1", "--multimodal_mode", "--separate_images", "--bf16", "--gradient_checkpointing",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", *extra]


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


# ---------------------------------------------------------------------------------------------- training via CLI
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cli_full_training_step_changes_every_component(family: str, tiny: Any, mixed_jsonl: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """One full fine-tuning step through ``adpo.cli.main``: the loss is log 2 (the policy equals the reference), the
    saved model reloads and every component moved."""
    model_dir = tiny(family)
    assert main(_cli_args(model_dir, mixed_jsonl, tmp_path)) == 0
    assert f"final train loss {math.log(2):.4f}" in capsys.readouterr().out
    before, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(model_dir)))
    after, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path)))
    assert type(processor).__name__ == type(load_model_and_processor(
        ModelArguments(model_name_or_path=str(model_dir)))[1]).__name__
    old = dict(before.named_parameters())
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}
    for component in COMPONENTS:
        path = component_path(after, component)
        assert any(_under(n, path) for n in changed), f"{component} ({path}) did not change"


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cli_lora_on_vision_tower_and_projector(family: str, tiny: Any, mixed_jsonl: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's PEFT variant: LoRA on vision_tower,mm_projector with gradient checkpointing.

    The adapter config selects Linear layers inside the vision tower (never the Conv patch embedding; in a
    convolutional tower its ungrouped convolutions) and keeps
    --lora_dropout; after one step every lora_B inside the vision tower is non-zero, which Adam only does for
    parameters that received a gradient (lora_B starts at zero).
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    args = _cli_args(tiny(family), mixed_jsonl, tmp_path, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                     "--lora_dropout", "0.1", "--lora_target_modules", "vision_tower,mm_projector")
    assert main(args) == 0
    assert f"final train loss {math.log(2):.4f}" in capsys.readouterr().out
    config = LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    base, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    vision = component_path(base, "vision_tower")
    selected = {n: m for n, m in base.named_modules() if check_target_module_exists(config, n)}
    assert any(_under(n, vision) for n in selected)
    # Linear layers; in a tower without any (Gemma 3n's MobileNetV5), its ungrouped convolutions
    conv_tower = not any(isinstance(m, nn.Linear) for m in component_modules(base, "vision_tower").values())
    assert all(isinstance(m, nn.Linear) or (conv_tower and _under(n, vision) and lora_adaptable_conv(m))
               for n, m in selected.items())
    assert not any(_under(n, component_path(base, "language_model")) for n in selected)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    vision_b = {k: v for k, v in weights.items() if "lora_B" in k and f"{vision}." in k
                and "merger" not in k}
    assert vision_b and all(v.abs().sum() > 0 for v in vision_b.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cli_lora_all_linear(family: str, tiny: Any, mixed_jsonl: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """--lora_target_modules all-linear: one step, loss log 2, and lora_B moved in the vision tower and the language
    model (every Linear layer of the model is adapted, the LM head excepted; a tower without Linear layers, Gemma
    3n's, gets none)."""
    args = _cli_args(tiny(family), mixed_jsonl, tmp_path, "--use_peft", "--lora_target_modules", "all-linear")
    assert main(args) == 0
    assert f"final train loss {math.log(2):.4f}" in capsys.readouterr().out
    base, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    moved = {k for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
             if "lora_B" in k and v.abs().sum() > 0}
    for component in ("vision_tower", "language_model"):
        adapted = any(f"{component_path(base, component)}." in k for k in moved)
        assert adapted == any(isinstance(m, nn.Linear) for m in component_modules(base, component).values())


@pytest.mark.slow
def test_train_script_subprocess_qwen2_vl(tiny: Any, mixed_jsonl: Path, tmp_path: Path) -> None:
    """``python train_adpo_multimodal.py`` in a fresh process (Qwen2-VL: image-only processor, torchvision-free)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    args = _cli_args(tiny("qwen2_vl"), mixed_jsonl, tmp_path, "--use_peft", "--lora_target_modules", "all-linear")
    done = subprocess.run([sys.executable, str(REPO / "train_adpo_multimodal.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adpo: trained 1 steps" in done.stdout
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "processor_config.json").is_file()


# ------------------------------------------------------------------------------------------------ log-probs
def _plain_response_logp(model: nn.Module, processor: Any, row: dict[str, Any], side: str) -> torch.Tensor:
    """log P(response | side's prompt) from one unpadded example, built without the collator.

    Chat-template families: the processor encodes the whole rendered conversation (prompt + answer) in one call,
    so every per-token input (Mllama's cross_attention_mask, Gemma 3's token_type_ids, Qwen's mm_token_type_ids)
    comes from the processor itself over the full length. No template (PaliGemma): the processor's own prefix /
    suffix convention, ``<image>`` per image before the text and the response as the suffix.
    """
    tokenizer = processor.tokenizer
    images = [image.convert("RGB") for image in row[f"{side}_images"]]
    if processor.chat_template:
        user = {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": row[side]}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": row["response"]}]}
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template([user, answer], tokenize=False)
        if full.startswith(prompt):
            response = full[len(prompt):]
        else:  # LLaVA-OneVision: the answer as rendered and what closes its turn, after the generation prompt
            response = full[full.rindex(row["response"]):]
        inputs = processor(text=[prompt + response], images=[images], add_special_tokens=False, return_tensors="pt")
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        inputs = processor(text=[processor.image_token * len(images) + row[side]], images=[images],
                           suffix=[row["response"]], return_tensors="pt")
        inputs.pop("labels")
        response_ids = [*tokenizer(row["response"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    inputs = inputs.to(dtype=model.dtype)  # floating tensors only: Llama 4's image processor gives bfloat16 pixels
    ids = inputs["input_ids"][0]
    n = len(response_ids)
    assert ids[-n:].tolist() == response_ids
    with torch.no_grad():
        logits = model(**inputs).logits[0, -n - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[-n:, None]).sum()


@pytest.mark.parametrize("head", ["auto", "model"], ids=["fused_head", "model_head"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trainer_logps_equal_plain_forward(family: str, head: str, tiny: Any, mixed_jsonl: Path,
                                           tmp_path: Path) -> None:
    """The trainer's per-row log-probs (one padded forward over [chosen; rejected], LM head at response positions
    only) equal a plain forward pass per example, for rows of different lengths and image counts, with adpo's
    vocabulary-chunked head (``--fused_lm_head auto``, the default: fused unless the model soft-caps its logits,
    as Gemma 3n does) and with the model's own head.

    Tolerance: the per-token means agree to 1e-5 outright. The sums reach ~150, where one fp32 ulp is 1.5e-5 and
    a batched forward (other matmul shapes, padding) legitimately differs by a few ulps, so they get 1e-5
    absolute plus 1e-6 relative (8 ulps).
    """
    trainer, processor = build_trainer(
        ModelArguments(model_name_or_path=str(tiny(family))), DataArguments(dataset_name=str(mixed_jsonl)),
        ADPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, fused_lm_head=head),
    )
    batch = trainer.data_collator(_rows())
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # a padded batch
    for key in SEQUENCE_KEYS:
        if key in batch:
            assert batch[key].shape[:2] == batch["input_ids"].shape, key
    model = trainer.model.eval()
    plain = torch.stack([_plain_response_logp(model, processor, row, side)
                         for side in ("chosen", "rejected") for row in ROWS])
    counts = batch["response_mask"].sum(1)
    # The head is chosen on the first call (a no-grad probe), then used for every call.
    for call in range(2):
        _, metrics = trainer.loss_and_metrics(model, trainer._prepare_inputs(batch))
        trainer_logps = torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]])
        torch.testing.assert_close(trainer_logps / counts, plain / counts, atol=1e-5, rtol=0, msg=f"call {call}")
        torch.testing.assert_close(trainer_logps, plain, atol=1e-5, rtol=1e-6, msg=f"call {call}")
    softcapped = getattr(trainer.model.config.get_text_config(), "final_logit_softcapping", None) is not None
    assert trainer.lm_head["policy"].fused is (head == "auto" and not softcapped)


def test_paligemma_response_is_the_causal_suffix(tiny: Any) -> None:
    """PaliGemma's prefix-LM mask: token_type_ids 0 over image + prompt (bidirectional), 1 over the response."""
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny("paligemma"))))
    batch = ADPOCollator(processor, multimodal=True)(_rows())
    types, response, attention = batch["token_type_ids"], batch["response_mask"], batch["attention_mask"].bool()
    assert torch.equal(types.bool(), response)
    assert not types[attention & ~response].any()


# ------------------------------------------------------------------------------------------------ save / reload
def test_logit_softcapping_falls_back_to_the_models_head(tiny: Any, mixed_jsonl: Path, tmp_path: Path) -> None:
    """A model that transforms its head's output (PaliGemma 2's Gemma-2 soft-capping) is scored with its own head:
    the trainer falls back and still equals the plain forward, which includes the soft-capping; forcing the fused
    head is refused rather than returning log-probs without it."""
    trainer, processor = build_trainer(
        ModelArguments(model_name_or_path=str(tiny("paligemma"))), DataArguments(dataset_name=str(mixed_jsonl)),
        ADPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
    )
    model = trainer.model.eval()
    model.config.text_config.final_logit_softcapping = 0.05  # small: it changes every log-prob a lot
    batch = trainer._prepare_inputs(trainer.data_collator(_rows()))
    plain = torch.stack([_plain_response_logp(model, processor, row, side)
                         for side in ("chosen", "rejected") for row in ROWS])
    for call in range(2):  # the first call's probe finds the transform; no call uses the fused head
        _, metrics = trainer.loss_and_metrics(model, dict(batch))
        trainer_logps = torch.cat([metrics["logps/chosen"], metrics["logps/rejected"]])
        torch.testing.assert_close(trainer_logps, plain, atol=1e-5, rtol=1e-6, msg=f"call {call}")
        assert trainer.lm_head["policy"].fused is False
    model.config.text_config.final_logit_softcapping = None
    uncapped = torch.stack([_plain_response_logp(model, processor, row, side)
                            for side in ("chosen", "rejected") for row in ROWS])
    assert (uncapped - plain).abs().max() > 0.3  # 10⁴× the tolerance: the soft-capping was in effect
    model.config.text_config.final_logit_softcapping = 0.05
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    with pytest.raises(ValueError, match="transforms its LM head's output.*--fused_lm_head auto or model"):
        choose_lm_head(model, model.get_output_embeddings(), batch, mask, "fused")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_and_reload_give_identical_log_probs(family: str, tiny: Any, mixed_jsonl: Path, tmp_path: Path) -> None:
    """Train one step, save model + processor, reload both: same batch, bit-identical log-probs."""
    trainer, processor = build_trainer(
        ModelArguments(model_name_or_path=str(tiny(family))), DataArguments(dataset_name=str(mixed_jsonl)),
        ADPOConfig(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1, learning_rate=1e-3,
                   per_device_train_batch_size=2, save_strategy="no"),
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(out)
    processor.save_pretrained(out)
    reloaded, reloaded_processor = load_model_and_processor(ModelArguments(model_name_or_path=str(out)))
    batch = ADPOCollator(processor, multimodal=True)(_rows())
    batch_again = ADPOCollator(reloaded_processor, multimodal=True)(_rows())
    assert batch.keys() == batch_again.keys()
    for key in batch:
        assert torch.equal(batch[key], batch_again[key]), key
    mask = batch.pop("response_mask")
    batch.pop("row_ids")
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = response_logps(trained, trained.get_output_embeddings(), batch, mask).sums
        got = response_logps(reloaded.eval(), reloaded.get_output_embeddings(), batch, mask).sums
    assert torch.equal(expected, got)


# ------------------------------------------------------------------------------------------------ LoRA / freezing
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_in_vision_tower_gets_gradients_with_checkpointing(family: str, use_reentrant: bool, tiny: Any,
                                                                 mixed_jsonl: Path, tmp_path: Path) -> None:
    """Every LoRA lora_B inside the vision tower (and the projector) gets a non-zero gradient from the ADPO loss
    with gradient checkpointing on, re-entrant or not (lora_A's gradient is zero while lora_B is zero)."""
    trainer, _ = build_trainer(
        ModelArguments(model_name_or_path=str(tiny(family)), use_peft=True,
                       lora_target_modules="vision_tower,mm_projector"),
        DataArguments(dataset_name=str(mixed_jsonl)),
        ADPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_checkpointing=True,
                   gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}),
    )
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    model.train()
    trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(_rows()[:2]))).backward()
    base = model.get_base_model()
    for component in ("vision_tower", "mm_projector"):
        path = component_path(base, component)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad
                  and _under(n.replace("base_model.model.", "", 1), path)
                  and ("lora_B" in n or "modules_to_save" in n)}
        if component == "vision_tower":
            params = {n: p for n, p in params.items() if "merger" not in n}  # Qwen's merger is the projector
        assert params, component
        zero = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not zero, f"{component}: no gradient reached {zero}"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_target_resolution(family: str, tiny: Any) -> None:
    """Default = the language model's Linear layers; all-linear = Linear layers only (no Conv patch embedding);
    component names map to the family's modules; an unknown name lists the valid ones."""
    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    language = component_path(model, "language_model")
    default = lora_targets(model, None)
    assert default and all(_under(n, language) for n in default)
    assert {n for n, m in model.named_modules() if _under(n, language) and lora_adaptable(m)} == set(default)
    vision = lora_targets(model, "vision_tower")
    assert vision and all(_under(n, component_path(model, "vision_tower")) for n in vision)
    if family.startswith("qwen"):
        assert not any("merger" in n for n in vision)  # the merger is the projector, not the tower
    with pytest.raises(ValueError, match="vision_tower.*all-linear.*q_proj"):
        lora_targets(model, "vision_towr")
    unadaptable = not_lora_adaptable(model)  # Llama 4's MoE routers
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    linear = {n for n, m in model.named_modules() if lora_adaptable(m)}
    peft = apply_lora(model, ModelArguments(model_name_or_path="x", use_peft=True, lora_target_modules="all-linear"))
    wrapped = {n.replace("base_model.model.", "", 1): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and all(lora_adaptable(m.base_layer) for m in wrapped.values())
    assert linear - set(wrapped) == {head}  # every Linear layer LoRA can wrap but the LM head
    assert not set(wrapped) & set(unadaptable)
    assert not hasattr(peft.get_output_embeddings(), "lora_A")  # all-linear leaves the LM head alone


def test_lora_suffixes_and_projector_without_linear(tiny: Any) -> None:
    """Suffixes select by module name; Gemma 3's projector (no Linear layer) is trained whole via modules_to_save,
    and asking for it alone is a clear error (PEFT needs one LoRA layer)."""
    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny("gemma3"))))
    targets = lora_targets(model, "q_proj,v_proj")
    assert targets and all(n.endswith((".q_proj", ".v_proj")) for n in targets)
    assert any(_under(n, "model.vision_tower") for n in targets) and any(_under(n, "model.language_model")
                                                                         for n in targets)
    with pytest.raises(ValueError, match="model.multi_modal_projector has no Linear layer"):
        apply_lora(model, ModelArguments(model_name_or_path="x", use_peft=True, lora_target_modules="mm_projector"))
    args = ModelArguments(model_name_or_path="x", use_peft=True, lora_target_modules="vision_tower,mm_projector")
    trainable = {n for n, p in apply_lora(model, args).named_parameters() if p.requires_grad}
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert all("multi_modal_projector.modules_to_save" in n or ("vision_tower" in n and "lora_" in n)
               for n in trainable)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_freeze_components(family: str, tiny: Any) -> None:
    """--freeze_vision_tower / --freeze_mm_projector fix exactly those components' parameters."""
    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    vision, projector = component_path(model, "vision_tower"), component_paths(model, "mm_projector")
    assert freeze_components(model, ["vision_tower"]) > 0
    for name, param in model.named_parameters():
        in_vision = _under(name, vision) and not any(_under(name, p) for p in projector)
        assert param.requires_grad != in_vision, name
    freeze_components(model, ["mm_projector"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if any(_under(n, q) for q in projector))
    assert any(p.requires_grad for n, p in model.named_parameters() if _under(n, component_path(model,
                                                                                               "language_model")))


@pytest.mark.slow
def test_cli_freeze_vision_tower_keeps_it_fixed(tiny: Any, mixed_jsonl: Path, tmp_path: Path) -> None:
    """Qwen2-VL (its projector sits inside the tower): the tower stays fixed, the merger and the LM train."""
    model_dir = tiny("qwen2_vl")
    assert main(_cli_args(model_dir, mixed_jsonl, tmp_path, "--freeze_vision_tower")) == 0
    before, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(model_dir)))
    after, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path)))
    old = dict(before.named_parameters())
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}
    assert not any(_under(n, "model.visual") and not _under(n, "model.visual.merger") for n in changed)
    assert any(_under(n, "model.visual.merger") for n in changed)
    assert any(_under(n, "model.language_model") for n in changed)


def test_freeze_flags_with_peft_are_rejected() -> None:
    with pytest.raises(ValueError, match="full fine-tuning"):
        ModelArguments(model_name_or_path="x", use_peft=True, freeze_vision_tower=True)


# ------------------------------------------------------------------------------------------------ image flags
# Per family: an --image_processor_kwargs value that changes the pixel tensor's shape, and the shape it gives
# (a trailing slice of pixel_values.shape). The seed's {"size": {"height", "width"}} form is used where the
# family's processor takes it; Qwen's size is in pixels, LLaVA-NeXT's tiles follow image_grid_pinpoints.
SIZE_KWARGS: dict[str, tuple[str, tuple[int, ...]]] = {
    "idefics3": ('{"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 64}}', (64, 64)),
    "llava": ('{"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}', (24, 24)),
    "llava_next": ('{"image_grid_pinpoints": [[16, 16]]}', (2, 3, 16, 16)),  # base view + one tile
    "mllama": ('{"size": {"height": 24, "width": 24}, "do_rescale": true}', (3, 24, 24)),
    # About 64x64 pixels (aspect kept): ~64 patches per image instead of 4-16; checked against image_grid_thw below.
    "qwen2_vl": ('{"size": {"shortest_edge": 3000, "longest_edge": 5000}}', (384,)),
    "qwen2_5_vl": ('{"size": {"shortest_edge": 3000, "longest_edge": 5000}}', (384,)),
    "qwen3_vl": ('{"size": {"shortest_edge": 3000, "longest_edge": 5000}}', (384,)),
    "qwen3_5": ('{"size": {"shortest_edge": 3000, "longest_edge": 5000}}', (384,)),
    "glm4v": ('{"size": {"shortest_edge": 2000, "longest_edge": 5000}}', (384,)),
    "smolvlm": ('{"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 64}}', (64, 64)),
    "llava_onevision": ('{"image_grid_pinpoints": [[16, 16]]}', (2, 3, 16, 16)),  # base view + one tile
    "internvl": ('{"size": {"height": 24, "width": 24}}', (3, 24, 24)),
    "aya_vision": ('{"size": {"height": 24, "width": 24}}', (3, 24, 24)),
    "gemma4": ('{"max_soft_tokens": 140}', (1260, 48)),  # up to 140 soft tokens of 3x3 patches per image
    "gemma3": ('{"size": {"height": 48, "width": 48}, "do_rescale": true}', (3, 48, 48)),
    "mistral3": ('{"size": {"longest_edge": 48}}', (3, 40, 48)),  # padded to the batch's largest image
    "lfm2_vl": ('{"max_image_tokens": 16}', (64, 48)),  # up to 16 tokens of 2x2 patches per image
    "llama4": ('{"size": {"height": 24, "width": 24}}', (3, 24, 24)),
    "gemma3n": ('{"size": {"height": 48, "width": 48}}', (3, 48, 48)),
    "paligemma": ('{"size": {"height": 48, "width": 48}, "do_rescale": true}', (3, 48, 48)),
}


def _image_tokens(processor: Any, batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"] == processor.image_token_id).sum(1).tolist()


def _qwen_tokens_from_grid(batch: dict[str, torch.Tensor], images_per_row: list[int]) -> list[int]:
    """Image tokens each row should hold: its images' grid_thw products over the 2x2 merge."""
    per_image = (batch["image_grid_thw"].prod(-1) // 4).split(images_per_row)
    return [int(tokens.sum()) for tokens in per_image]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_image_flags_change_what_the_model_receives(family: str, tiny: Any) -> None:
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    rows = _rows()[:2]
    default = ADPOCollator(processor, multimodal=True)(rows)

    kwargs_json, shape = SIZE_KWARGS[family]
    kwargs = DataArguments(image_processor_kwargs=kwargs_json).image_processor_kwargs_dict()
    sized = ADPOCollator(processor, multimodal=True, image_processor_kwargs=kwargs)(rows)
    tail = slice(-len(shape), None)
    images_per_row = [1, 3, 2, 1]  # chosen rows, then rejected rows
    if "image_grid_thw" in default:  # flat patches: one row per 8x8 patch, 2x2 patches merge into one token
        grid = sized["image_grid_thw"]
        pixels = grid[:, 1] * grid[:, 2] * 8 * 8
        low, high = kwargs["size"]["shortest_edge"], kwargs["size"]["longest_edge"]  # pixel counts
        if family == "glm4v":  # GLM's budget counts an image's two temporal frames
            low, high = low // 2, high // 2
        assert ((pixels >= low) & (pixels <= high)).all() and len(grid) == sum(images_per_row)
        assert sized["pixel_values"].shape[0] == grid.prod(-1).sum() > default["pixel_values"].shape[0]
        assert _image_tokens(processor, sized) == _qwen_tokens_from_grid(sized, images_per_row)
    else:
        assert tuple(sized["pixel_values"].shape[tail]) == shape != tuple(default["pixel_values"].shape[tail])

    shrunk = ADPOCollator(processor, multimodal=True, max_image_size=8)(rows)
    assert shrunk["pixel_values"].shape != default["pixel_values"].shape or not torch.equal(
        shrunk["pixel_values"], default["pixel_values"])
    if "image_grid_thw" in default:  # longest edge 8, then upscaled to at least 16x16 pixels (aspect kept)
        assert _image_tokens(processor, shrunk) == _qwen_tokens_from_grid(shrunk, images_per_row)
        assert _image_tokens(processor, shrunk) != _image_tokens(processor, default)  # GLM rounds up to 28 pixels
    if family == "llava_next":  # image_sizes are the sizes after --max_image_size
        assert shrunk["image_sizes"].amax() <= 8 < default["image_sizes"].amax()
        assert sum(_image_tokens(processor, shrunk)) < sum(_image_tokens(processor, default))

    if processor.image_processor.do_normalize:
        rescaled = ADPOCollator(processor, multimodal=True, image_processor_kwargs={"do_normalize": False})(rows)
        assert rescaled["pixel_values"].min() >= 0 > default["pixel_values"].min()
    else:  # Gemma 4 feeds [0, 1] pixels by default
        centred = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        rescaled = ADPOCollator(processor, multimodal=True, image_processor_kwargs=centred)(rows)
        assert rescaled["pixel_values"].min() < 0 <= default["pixel_values"].min()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_bad_image_processor_kwargs_are_clear_errors(family: str, tiny: Any) -> None:
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny(family))))
    with pytest.raises(ValueError, match=r"does not take \['sizee'\]; valid keys: .*'size'"):
        ADPOCollator(processor, multimodal=True, image_processor_kwargs={"sizee": 3})
    with pytest.raises(ValueError, match="rejects them"):
        ADPOCollator(processor, multimodal=True, image_processor_kwargs={"size": {"depth": 3}})


def test_image_processor_kwargs_bad_json() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        DataArguments(image_processor_kwargs='{"size": {"height": 336,}')
    with pytest.raises(ValueError, match="must be a JSON object"):
        DataArguments(image_processor_kwargs="[1, 2]")


def test_seed_image_processor_kwargs_example(tiny: Any) -> None:
    """The seed's exact example reaches the image processor: 336x336 pixels (PaliGemma's SigLIP takes height/width)."""
    seed = '{"size": {"height": 336, "width": 336}, "do_rescale": true}'
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny("paligemma"))))
    kwargs = DataArguments(image_processor_kwargs=seed).image_processor_kwargs_dict()
    batch = ADPOCollator(processor, multimodal=True, image_processor_kwargs=kwargs)(_rows()[:1])
    assert batch["pixel_values"].shape[-2:] == (336, 336)


def test_build_tiny_rejects_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model family 'llama9'.*paligemma"):
        build_tiny("llama9", tmp_path)


def test_jsonl_rows_roundtrip(mixed_jsonl: Path) -> None:
    """The JSONL written for the CLI tests holds the rows' differing image counts."""
    rows = [json.loads(line) for line in mixed_jsonl.read_text().splitlines()]
    assert [(len(r["chosen_images"]), len(r["rejected_images"])) for r in rows] == [(1, 2), (3, 1), (1, 1), (2, 2)]


# ------------------------------------------------------------------------------------------------ processor loading
def _saved_processor(folder: Path) -> dict[str, Any]:
    """What a folder says about its processor: processor_config.json, the chat template, the tokenizer files."""
    template = folder / "chat_template.jinja"
    return {"processor_config": json.loads((folder / "processor_config.json").read_text()),
            "chat_template": template.read_text() if template.is_file() else None,
            "tokenizer": json.loads((folder / "tokenizer_config.json").read_text()),
            "vocabulary": json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_processor_reload_keeps_every_setting(family: str, tiny: Any, tmp_path: Path) -> None:
    """The folder was written by the real processor class; load_processor then save_pretrained writes back every
    setting (processor and image processor exactly; the tokenizer's special tokens and vocabulary; the chat
    template) and names the same processor class. (transformers itself may add tokenizer keys on a reload, e.g.
    the class's default unk token, so the tokenizer is compared on what the folder saved.)"""
    from adpo.processing import load_processor

    folder = tiny(family)
    processor = load_processor(str(folder))
    processor.save_pretrained(tmp_path)
    before, after = _saved_processor(folder), _saved_processor(tmp_path)
    for key in ("chat_template", "vocabulary"):
        assert after[key] == before[key], key
    # Every saved setting keeps its value; a part that can be built here (a video processor with torchvision)
    # also writes its class defaults.
    for key, value in before["processor_config"].items():
        if isinstance(value, dict):
            assert {k: after["processor_config"][key].get(k) for k in value} == value, key
        else:
            assert after["processor_config"][key] == value, key
    special = [k for k in before["tokenizer"] if k.endswith("_token") or k == "extra_special_tokens"]
    assert special and {k: after["tokenizer"].get(k) for k in special} == {k: before["tokenizer"][k] for k in special}
    saved = before["processor_config"]
    assert type(processor).__name__ == saved["processor_class"]
    for key, value in saved.items():  # the settings are live on the processor, not only written back
        if key != "processor_class" and not isinstance(value, dict):
            assert getattr(processor, key) == value, key


@_NEEDS_TORCHVISION
def test_llama4_forward_is_repaired(tiny: Any) -> None:
    """transformers 5.24's Llama4ForConditionalGeneration.forward raises AttributeError after computing the logits
    (it reads ``image_outputs`` from its language model's output). adpo.compat repairs the loaded instance; the
    repaired forward's logits equal the language model run on the merged embeddings by hand. Where a release has
    fixed the bug, nothing is repaired and the plain forward gives the same logits."""
    from transformers import AutoModelForImageTextToText

    from adpo.compat import llama4_reads_missing_image_outputs, repair_model

    folder = tiny("llama4")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = load_processor_for(ModelArguments(model_name_or_path=str(folder)))
    assert type(processor).__name__ == "Llama4Processor"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                         "text": "What is it?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[ROWS[0]["chosen_images"][0]]], return_tensors="pt")
    assert inputs["pixel_values"].dtype == torch.bfloat16  # Llama 4's image processor returns bfloat16 pixels
    inputs = inputs.to(dtype=model.dtype)
    with torch.no_grad():
        features = model.multi_modal_projector(model.get_image_features(inputs["pixel_values"]).last_hidden_state
                                               .flatten(0, -2))
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds = embeds.masked_scatter((inputs["input_ids"] == model.config.image_token_id)[..., None], features)
        expected = model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        if llama4_reads_missing_image_outputs(model):
            with pytest.raises(AttributeError, match="image_outputs"):
                model(**inputs)
            assert len(repair_model(model)) == 1
            assert repair_model(model) == []  # once per instance
        else:
            assert repair_model(model) == []
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_unavailable_video_processor_keeps_its_settings(tiny: Any, tmp_path: Path) -> None:
    """A folder with saved video settings whose video processor cannot be built here: the settings stay readable
    (SmolVLM2's chat template reads num_frames / fps for image rows too), are written back on save, and the
    stand-in refuses to process videos."""
    import shutil

    from transformers import AutoProcessor

    from adpo.processing import UnavailablePart, load_processor

    folder = tmp_path / "with_video"
    shutil.copytree(tiny("qwen3_vl"), folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["video_processor"] = {"video_processor_type": "Qwen3VLVideoProcessor", "num_frames": 7, "fps": 3,
                                 "patch_size": 16}
    (folder / "processor_config.json").write_text(json.dumps(config))
    try:
        AutoProcessor.from_pretrained(folder)
        pytest.skip("the video processor can be built here")
    except Exception:  # noqa: BLE001 - any failure of the plain path is what load_processor handles
        pass
    processor = load_processor(str(folder))
    assert isinstance(processor.video_processor, UnavailablePart)
    assert (processor.video_processor.num_frames, processor.video_processor.fps) == (7, 3)
    with pytest.raises(RuntimeError, match="video_processor is not available"):
        processor.video_processor(videos=[])
    processor.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text()) == config


def test_processor_errors_name_what_is_missing(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing package (the processor's constructor needs it) or a missing file is named, not an OSError about
    the video processor."""
    import shutil

    from adpo.processing import ProcessorLoadError, load_processor

    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny("qwen2_vl"), folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ProcessorLoadError, match="tokenizer of .* is empty: the folder has no tokenizer files"):
        load_processor(str(folder))

    import transformers.models.idefics3.processing_idefics3 as module

    original = module.Idefics3Processor.__init__

    def needs_package(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError("No module named 'num2words'", name="num2words")

    monkeypatch.setattr(module.Idefics3Processor, "__init__", needs_package)
    with pytest.raises(ProcessorLoadError, match=r"'num2words' is not installed \(pip install num2words\)"):
        load_processor(str(tiny("idefics3")))
    monkeypatch.setattr(module.Idefics3Processor, "__init__", original)


# ------------------------------------------------------------------------------------------------ chat templates
def test_template_that_drops_the_answer_is_refused_naming_the_template(tiny: Any) -> None:
    """A template whose assistant turn neither continues the generation prompt nor shows the answer is refused
    when the collator is built, with a message about the template (not a data row)."""
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny("llava"))))
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'user' %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(ValueError, match="chat template of LlavaProcessor does not render the assistant's text"):
        ADPOCollator(processor, multimodal=True)


# ------------------------------------------------------------------------------------------------ components
# Model types of MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES that adpo supports (docs/families.md).
SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm", "llava", "llava_next", "llava_onevision", "mllama", "qwen2_vl",
                         "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "gemma3n", "gemma4", "paligemma", "internvl",
                         "glm4v", "aya_vision", "llama4", "mistral3", "lfm2_vl")


def _small(config: Any) -> None:
    """One layer everywhere (the walk only needs the module structure)."""
    for key in ("num_hidden_layers", "depth", "num_layers", "num_global_layers"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > 1:
            setattr(config, key, 1)
    if getattr(config, "num_kv_shared_layers", 0):  # Gemma 3n: layers that reuse earlier layers' caches
        config.num_kv_shared_layers = 0
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[-1:]
    for key in ("text_config", "vision_config", "audio_config"):
        if getattr(config, key, None) is not None:
            _small(getattr(config, key))


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_components_resolve_for_every_supported_model_type(model_type: str) -> None:
    """Each supported model type's model class (its default config, one layer, on the meta device) has a vision
    tower, a projector and a language model in COMPONENTS; they do not overlap, and together with the LM head
    (and an audio tower where the family has one) they hold every parameter."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    assert model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    overrides = {"gemma4": {"vision_config": {}},  # optional in the config class, present in every checkpoint
                 "aya_vision": {"vision_config": {"model_type": "siglip_vision_model", "num_attention_heads": 16}}}
    config = CONFIG_MAPPING[model_type](**overrides.get(model_type, {}))
    _small(config)
    if model_type == "gemma3n":
        pytest.importorskip("timm", exc_type=ImportError)  # its vision tower is a timm model
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    owner: dict[str, str] = {}
    for component in COMPONENTS:
        modules = component_modules(model, component)
        assert any(next(m.parameters(recurse=False), None) is not None for m in modules.values()), component
        # (Gemma 3's projector and Gemma 3n's MobileNet tower have no Linear layer: LoRA trains them whole.)
        assert any(isinstance(m, nn.Linear) for m in modules.values()) or component != "language_model"
        for name, module in modules.items():
            for param_name, _ in module.named_parameters(recurse=False):
                assert owner.setdefault(f"{name}.{param_name}", component) == component, (name, component)
    lm_head = {n for n, _ in model.named_parameters() if n.startswith(("lm_head.", "language_model.lm_head."))}
    rest = {n for n, _ in model.named_parameters()} - set(owner) - lm_head
    # LLaVA-NeXT / -OneVision's image_newline is a parameter of the model itself, appended to image features.
    assert all("audio" in n or n == "model.image_newline" for n in rest), sorted(rest)[:5]
