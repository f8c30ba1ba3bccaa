"""FSDP2 (``fully_shard`` on every decoder layer and the root, gloo on CPU) around response_logps.

Launched by tests/test_distributed.py under torchrun with 2 processes. Each rank scores the same batch with adpo's
fused head (small vocabulary blocks, so several) and with the model's own head, backpropagates, gathers every
parameter's gradient and saves rank 0's results, which the test compares with an unsharded single-process run.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from adpo.collator import RESPONSE_MASK, ROW_IDS, ADPOCollator
from adpo.logprobs import response_logps

ROWS = [
    {"response": "A red apple.", "chosen": "Describe the red fruit in the bowl.", "rejected": "Hi", "_adpo_row": 0},
    {"response": "The quick brown fox jumps.", "chosen": "Go", "rejected": "Say it, please.", "_adpo_row": 1},
]


def score(model_dir: str, fused: bool, shard: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = ADPOCollator(tok, multimodal=False)(ROWS)
    mask = batch.pop(RESPONSE_MASK)
    batch.pop(ROW_IDS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if shard:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    sums = response_logps(model, model.get_output_embeddings(), batch, mask, fused=fused, vocab_chunk=256).sums
    sums.sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return sums.detach(), grads


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    results = {fused: score(model_dir, fused, shard=True) for fused in (True, False)}
    if dist.get_rank() == 0:
        torch.save(results, out)
    gc.collect()  # free the sharded models (and their hold on the group) while the interpreter is whole
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
