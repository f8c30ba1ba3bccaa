"""The analytic FLOP count of one ADPO training step, for MFU and HFU (``bench/bench_gpu.py``).

MFU (model FLOPs utilisation) = model FLOPs per step / step time / peak, peak = 989e12 bf16 dense FLOP/s (H100 SXM
and H200 datasheet; ``--peak_tflops`` to override). Model FLOPs per step, from an analytic count on one collated
batch (exact token counts of that batch; every batch is alike). For one forward over the 2B sequences:
    vision_lin  = tiles · P · 2·W_vis          P patches per tile (729 SigLIP; 577 CLIP incl. CLS),
                                               W_vis = Σ weight elements of the tower's Linear + Conv layers
    vision_attn = tiles · 4·L_vis·H_vis·P²     scores + weighted sum, bidirectional
    proj        = tiles · T_proj · 2·W_proj    T_proj tokens entering the projector per tile (81 / 576)
    lm_lin      = Σ_rows n_i · 2·W_lm          n_i non-pad tokens of row i (text + image tokens),
                                               W_lm = Σ Linear weight elements of the decoder layers
    lm_attn     = Σ_rows 4·L·A·n_i²            A = heads·head_dim; the full n² (Megatron convention; causal
                                               kernels do about half of it)
    head        = N_resp · 2·V·H               LM head only at the N_resp positions that predict a response
                                               token (adpo applies the head there only)
    lora        = Σ_rows n_i · 2·Σ r·(d_in + d_out)  over the adapted layers (0 without LoRA)
Backward costs 2x forward for a layer whose weights are trained (input gradient + weight gradient) and 1x for a
frozen layer that gradients must cross (input gradient only); the attention-score products have no weights, so their
backward is 2x forward whenever gradients cross them. Nothing before the first trained layer runs backward.
    full fine-tune, frozen-copy reference:  4 · (vision_lin + vision_attn + proj + lm_lin + lm_attn + head)
                                           (policy forward + backward = 3x, reference forward = 1x)
    LoRA on the language model, reference = adapters off:
        2·(vision_lin + vision_attn + proj) + 3·lm_lin + 4·lm_attn + 3·head + 3·lora
        (vision and projector: policy + reference forward only; lm_lin: 2 forwards + input gradient; lm_attn:
         2 forwards + 2x backward; head: 2 forwards + input gradient; lora: forward + input and weight gradients)
HFU (hardware FLOPs utilisation) adds the recomputations: under gradient checkpointing one more forward of the
checkpointed decoder layers (and, for full fine-tuning, of the vision encoder layers) in the trained path, and the
fused LM head's recomputation of the policy's head in backward (+1·head). MFU excludes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Arch:
    """Weight elements and shapes that the FLOP count needs (measured on the model before LoRA)."""

    vision_w: int
    vision_layers: int
    vision_width: int
    patches_per_tile: int
    proj_w: int
    proj_tokens_per_tile: int
    lm_w: int
    lm_layers: int
    lm_attn_width: int
    head_w: int
    lora_w: int = 0  # Σ r·(d_in + d_out) over LoRA-adapted layers


@dataclass
class Work:
    """Token counts of one step's batch (2B sequences)."""

    tiles: int
    row_tokens: list[int]
    response_tokens: int


def matmul_weights(module: nn.Module) -> int:
    """Σ weight elements of Linear and Conv layers: a forward costs 2x this per output position."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def measure_arch(model: nn.Module, family: Family) -> Arch:
    from adpo.modeling import COMPONENTS

    def component(name: str) -> nn.Module:
        names = dict(model.named_modules())
        return names[next(p for p in COMPONENTS[name] if p in names)]

    cfg = model.config
    vision, text = cfg.vision_config, cfg.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    side = vision.image_size // vision.patch_size
    return Arch(
        vision_w=matmul_weights(component("vision_tower")),
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        patches_per_tile=side * side + family.cls_token,
        proj_w=matmul_weights(component("mm_projector")),
        proj_tokens_per_tile=family.proj_tokens(cfg, side),
        lm_w=matmul_weights(component("language_model")),
        lm_layers=text.num_hidden_layers,
        lm_attn_width=text.num_attention_heads * head_dim,
        head_w=model.get_output_embeddings().weight.numel(),
    )


def forward_flops(arch: Arch, work: Work) -> dict[str, float]:
    """FLOPs of one forward over the batch, per part (see the module docstring)."""
    tokens = sum(work.row_tokens)
    return {
        "vision_lin": work.tiles * arch.patches_per_tile * 2.0 * arch.vision_w,
        "vision_attn": work.tiles * 4.0 * arch.vision_layers * arch.vision_width * arch.patches_per_tile**2,
        "proj": work.tiles * arch.proj_tokens_per_tile * 2.0 * arch.proj_w,
        "lm_lin": tokens * 2.0 * arch.lm_w,
        "lm_attn": sum(4.0 * arch.lm_layers * arch.lm_attn_width * n * n for n in work.row_tokens),
        "head": work.response_tokens * 2.0 * arch.head_w,
        "lora": tokens * 2.0 * arch.lora_w,
    }


def step_flops(arch: Arch, work: Work, lora: bool, checkpointing: bool,
               fused_head: bool = True) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training step: policy forward + backward and reference forward.

    Hardware FLOPs add the recomputations: checkpointed layers' forwards and, with adpo's fused LM head (the
    default), the policy head's forward again in its backward."""
    f = forward_flops(arch, work)
    if lora:
        model = (2 * (f["vision_lin"] + f["vision_attn"] + f["proj"]) + 3 * f["lm_lin"] + 4 * f["lm_attn"]
                 + 3 * f["head"] + 3 * f["lora"])
        recompute = f["lm_lin"] + f["lm_attn"] + f["lora"]
    else:
        model = 4 * sum(v for k, v in f.items() if k != "lora")
        recompute = f["vision_lin"] + f["vision_attn"] + f["lm_lin"] + f["lm_attn"]
    return model, model + (recompute if checkpointing else 0.0) + (f["head"] if fused_head else 0.0)


def idefics3_tiles(batch: dict[str, torch.Tensor], config: Any) -> int:
    """Tiles the vision tower sees: Idefics3 skips the all-zero padding tiles."""
    pv = batch["pixel_values"]
    per_tile = pv.shape[2:].numel()
    return int(((pv == 0.0).flatten(2).sum(-1) != per_tile).sum())


def llava_next_tiles(batch: dict[str, torch.Tensor], config: Any) -> int:
    """Tiles the vision tower sees: LLaVA-NeXT drops the padding tiles past each image's anyres grid."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return sum(image_size_to_num_patches(tuple(size.tolist()), config.image_grid_pinpoints,
                                         config.vision_config.image_size) for size in batch["image_sizes"])


@dataclass
class Family:
    key: str
    config_file: str
    cls_token: int  # 1 when the vision tower prepends a class token (CLIP)
    proj_tokens: Callable[[Any, int], int]
    count_tiles: Callable[[dict[str, torch.Tensor], Any], int]


FAMILIES = {
    "smolvlm": Family("smolvlm", "smolvlm_instruct", 0, lambda cfg, side: side * side // cfg.scale_factor**2,
                      idefics3_tiles),
    "llava": Family("llava", "llava_v1.6_mistral_7b", 1, lambda cfg, side: side * side, llava_next_tiles),
}


def measure_work(collator: Any, rows: list[dict[str, Any]], family: Family, config: Any) -> tuple[Work, dict, float]:
    """Collate one batch twice (the second call is timed); its token counts give the step's work."""
    collator(rows)
    t = time.perf_counter()
    batch = collator(rows)
    collate_s = time.perf_counter() - t
    work = Work(
        tiles=family.count_tiles(batch, config),
        row_tokens=batch["attention_mask"].sum(1).tolist(),
        response_tokens=int(batch["response_mask"].sum()),
    )
    return work, batch, collate_s
