"""Reference modes: precomputed on-disk log-probs (== live, reused, rebuilt on change), PEFT, another model."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from adpo.collator import REF_COUNTS, REF_LOGPS, REF_LOGPS_COLUMN, RESPONSE_MASK, ROW_IDS, ADPOCollator
from adpo.config import ADPOConfig, DataArguments, ModelArguments
from adpo.data import ROW_ID, load_adpo_dataset
from adpo.logprobs import response_logps
from adpo.modeling import load_model_and_processor, load_reference
from adpo.pipeline import build_trainer
from adpo.refcache import (
    ReferenceCacheError,
    RefLogpsTable,
    cache_key,
    dataset_fingerprint,
    load_or_compute,
    log_prob_settings,
    model_fingerprint,
    shard_indices,
)
from adpo.reference import LiveReference, PrecomputedReference, with_reference_columns
from adpo.testing.tiny import build_tiny_llama
from adpo.trainer import ADPOTrainer


class RecordingTrainer(ADPOTrainer):
    """Records every micro-batch's loss and reference log-probs, exactly as computed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.recorded.append(loss.item())
        return loss

    def reference_logps(self, model, inputs, mask, columns=None):  # noqa: ANN001, ANN201
        ref = super().reference_logps(model, inputs, mask, columns)
        if model.training:
            self.recorded_ref.append(ref.sums.detach().clone())
        return ref


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def make_trainer(model_dir: Path, train, tmp_path: Path, *, multimodal: bool, eval_dataset=None,
                 perturb_ref: float = 0.0, max_image_size: int | None = None, **config):
    """A fresh policy + frozen-copy reference from ``model_dir``; returns (trainer, reference forward counter, ref)."""
    args = ModelArguments(model_name_or_path=str(model_dir))
    model, processor = load_model_and_processor(args)
    ref = load_reference(args, model)
    if perturb_ref:
        with torch.no_grad():
            next(ref.parameters()).view(-1)[0] += perturb_ref
    calls = count_forwards(ref)
    training = ADPOConfig(
        output_dir=str(tmp_path / "out"), ref_cache_dir=str(tmp_path / "cache"), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, per_device_eval_batch_size=3, learning_rate=5e-3, max_steps=3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=7, **config,
    )
    collator = ADPOCollator(processor, multimodal=multimodal, max_image_size=max_image_size,
                            multitask=training.multitask_weight is not None)
    trainer = RecordingTrainer(model=model, args=training, ref_model=ref, data_collator=collator,
                               train_dataset=train, eval_dataset=eval_dataset, processing_class=processor)
    trainer.recorded, trainer.recorded_ref = [], []
    return trainer, calls, ref


MULTITASK_ROWS = [
    {"response": "This is a red apple.", "chosen": "Describe the red fruit.", "rejected": "Describe the fruit.",
     "prompt": "What fruit is shown?", "chosen_response": "A red apple.", "rejected_response": "A blue star."},
    {"response": "The shape is a blue square.", "chosen": "What blue shape is it?", "rejected": "What is it?",
     "prompt": "Which shape?", "chosen_response": "A square.", "rejected_response": "Two green triangles."},
] * 4


@pytest.fixture(params=["text", "image", "multitask", "bf16"])
def setup(request, tiny_llama, tiny_idefics3, text_jsonl, image_jsonl, tmp_path):
    """(model folder, rows, multimodal, extra config) for each kind of run."""
    if request.param in ("text", "bf16"):  # bf16: autocast, as under --bf16 on a GPU
        return tiny_llama, load_adpo_dataset(str(text_jsonl)), False, {"bf16": request.param == "bf16"}
    if request.param == "image":
        return tiny_idefics3, load_adpo_dataset(str(image_jsonl), max_samples=8), True, {}
    path = tmp_path / "multitask.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MULTITASK_ROWS))
    return tiny_llama, load_adpo_dataset(str(path)), False, {"multitask_weight": 0.5}


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is off by at most 2^-8 relative


def reference_sums_in_layout(trainer: ADPOTrainer, dataset, batch_size: int) -> torch.Tensor:
    """The live reference's log-probs of ``dataset``, (rows, sides), batched as the precompute pass batches it."""
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        mask = batch.pop(RESPONSE_MASK)
        batch.pop(ROW_IDS)
        with trainer.accelerator.autocast():
            sums = trainer.reference_logps(trainer.model, batch, mask).sums
        out.append(sums.view(-1, len(rows)).T)  # side-major (S·B,) → (B, S)
    trainer.recorded_ref.clear()
    return torch.cat(out)


def test_precomputed_reference_equals_live_and_is_reused(setup, tmp_path) -> None:
    """The precomputed columns are the live reference's log-probs bit for bit when batched alike (same batch layout:
    identical by construction, bf16 included). Training on them gives the live run's per-step losses (shuffled
    batches, gradient accumulation 2) and eval loss: to 1e-6 in fp32. Under bf16 autocast the live reference runs on
    the training batches, whose other shapes and padding make the CPU's bf16 kernels round differently (by CPU:
    AVX-512-BF16, AVX2): there each reference log-prob agrees to bf16 precision, |Δ| ≤ 2^-8·|log π_ref|, and so each
    loss to β·2^-8·max(|log π_ref(y|x_w)| + |log π_ref(y|x_l)|), since |∂L/∂log π_ref| ≤ β per pair for the sigmoid
    loss. Multitask: a table of 4 sides per row. The reference model is then freed; a second run loads the table
    and runs no reference forward."""
    model_dir, train, multimodal, extra = setup
    bf16 = extra.get("bf16", False)
    evals = train.select(range(3))
    live, live_calls, _ = make_trainer(model_dir, train, tmp_path, multimodal=multimodal, eval_dataset=evals,
                                         **extra)
    in_layout = reference_sums_in_layout(live, train, batch_size=3)
    live.train()
    live_eval = live.evaluate()["eval_loss"]
    assert live_calls[0] > 0 and len(live.recorded) == 6

    cached, cached_calls, ref = make_trainer(model_dir, train, tmp_path, multimodal=multimodal,
                                             eval_dataset=evals, precompute_ref_log_probs=True, **extra)
    assert cached.ref_model is None and cached.reference.cache_hits == 0
    ref_alive = weakref.ref(ref)
    del ref
    gc.collect()
    assert ref_alive() is None, "the reference model is still referenced after precomputing"
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and eval tables
    columns = torch.tensor(cached.train_dataset[REF_LOGPS_COLUMN])  # joined to the data: (rows, sides)
    assert columns.shape == (len(train), 4 if "multitask_weight" in extra else 2)
    assert torch.equal(columns, in_layout)  # same layout: the same numbers, on any CPU

    cached.train()
    if bf16:
        for got, want in zip(cached.recorded_ref, live.recorded_ref, strict=True):
            assert ((got - want).abs() <= BF16_UNIT_ROUNDOFF * want.abs()).all(), (got, want)
        tol = 0.1 * BF16_UNIT_ROUNDOFF * columns.abs().sum(1).max().item()  # β = 0.1
    else:
        tol = 1e-6
    assert max(abs(a - b) for a, b in zip(live.recorded, cached.recorded, strict=True)) <= tol
    logged = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (live, cached)]
    assert len(logged[0]) == 3 and max(abs(a - b) for a, b in zip(*logged, strict=True)) <= tol
    assert abs(cached.evaluate()["eval_loss"] - live_eval) <= tol
    assert abs(cached.predict(evals).metrics["test_loss"] - live.predict(evals).metrics["test_loss"]) <= tol
    assert live.recorded[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0: log 2

    again, again_calls, _ = make_trainer(model_dir, train, tmp_path, multimodal=multimodal,
                                         eval_dataset=evals, precompute_ref_log_probs=True, **extra)
    again.train()
    assert again.reference.cache_hits == 2 and again_calls[0] == 0
    assert again.recorded == cached.recorded


def test_cache_miss_and_hit_train_identically_with_dropout(tiny_llama, text_jsonl, tmp_path, monkeypatch) -> None:
    """Computing the table draws no random numbers from the run's streams: with dropout on (its masks come from the
    global generator), the same seeded run gives bit-identical losses whether its table was computed (miss) or
    loaded (hit). Shown to matter: letting the pass draw (its DataLoader takes a base seed) changes the losses."""
    from contextlib import nullcontext

    import adpo.refcache

    model_dir = tmp_path / "dropout_model"
    shutil.copytree(tiny_llama, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    train = load_adpo_dataset(str(text_jsonl))

    def losses(cache: str) -> tuple[list[float], int]:
        trainer, _, _ = make_trainer(model_dir, train, tmp_path / cache, multimodal=False,
                                     precompute_ref_log_probs=True, padding_free=False)
        trainer.train()
        return trainer.recorded, trainer.reference.cache_hits

    miss, hits = losses("a")
    assert hits == 0
    hit, hits = losses("a")
    assert hits == 1 and hit == miss
    monkeypatch.setattr(adpo.refcache, "preserved_rng", nullcontext)
    drawn, hits = losses("b")
    assert hits == 0 and drawn != miss


def test_cache_rebuilt_when_data_model_or_settings_change(tiny_idefics3, image_jsonl, tmp_path) -> None:
    """Changing one image file's bytes (same path), one reference weight, or --max_image_size gives a new key:
    the table is computed again; unchanged inputs hit the cache."""
    data = tmp_path / "data"
    shutil.copytree(image_jsonl.parent, data)
    rows = data / image_jsonl.name

    def build(**kw):
        dataset = load_adpo_dataset(str(rows), max_samples=4)
        trainer, calls, _ = make_trainer(tiny_idefics3, dataset, tmp_path, multimodal=True,
                                         precompute_ref_log_probs=True, **kw)
        return trainer.reference.cache_hits, calls[0]

    assert build() == (0, 3)  # 4 rows in batches of 3: two reference forwards, after the LM-head probe
    assert build() == (1, 0)
    image = Path(json.loads(rows.read_text().splitlines()[0])["chosen_images"][0])
    image = data / image if not image.is_absolute() else image
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    assert build()[0] == 0
    assert build() == (1, 0)
    assert build(perturb_ref=1e-3)[0] == 0
    assert build(max_image_size=16)[0] == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_peft_reference_shares_the_frozen_copy_cache(tiny_llama, text_jsonl, tmp_path) -> None:
    """The PEFT reference is the base model: same fingerprint as the plain model, so its table is the same one
    (a hit), and it equals the live adapters-disabled log-probs; a changed base weight changes the fingerprint."""
    from peft import LoraConfig, get_peft_model

    train = load_adpo_dataset(str(text_jsonl))
    plain, _, _ = make_trainer(tiny_llama, train, tmp_path, multimodal=False, precompute_ref_log_probs=True)

    model, tokenizer = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny_llama)))
    fingerprint = model_fingerprint(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert model_fingerprint(peft_model) == fingerprint
    args = ADPOConfig(output_dir=str(tmp_path / "peft"), ref_cache_dir=str(tmp_path / "cache"), report_to=[],
                      use_cpu=True, precompute_ref_log_probs=True)
    collator = ADPOCollator(tokenizer, multimodal=False)
    trainer = ADPOTrainer(model=peft_model, args=args, data_collator=collator, train_dataset=train)
    assert trainer.reference.cache_hits == 1
    batch = collator([plain.train_dataset[i] for i in range(4)])
    found = batch.pop(REF_LOGPS)
    inputs = {k: v for k, v in batch.items() if k not in (RESPONSE_MASK, ROW_IDS, REF_COUNTS)}
    live = LiveReference(None).logps(peft_model, inputs, batch[RESPONSE_MASK], trainer._logps)
    torch.testing.assert_close(found, live.sums, rtol=0, atol=1e-5)
    with torch.no_grad():
        peft_model.get_base_model().lm_head.weight[0, 0] += 1e-3
    assert model_fingerprint(peft_model) != fingerprint


def test_ref_model_name_or_path_uses_the_other_model(tiny_llama, text_jsonl, tmp_path) -> None:
    """--ref_model_name_or_path loads another checkpoint as the reference: its weights, its log-probs, its key."""
    other = build_tiny_llama(tmp_path / "other", seed=1)
    model_args = ModelArguments(model_name_or_path=str(tiny_llama), ref_model_name_or_path=str(other))
    args = ADPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer, _ = build_trainer(model_args, DataArguments(dataset_name=str(text_jsonl)), args)
    expected, tokenizer = load_model_and_processor(ModelArguments(model_name_or_path=str(other)))
    ref_state, expected_state = trainer.ref_model.state_dict(), expected.state_dict()
    assert all(torch.equal(ref_state[k], expected_state[k]) for k in expected_state)
    assert not torch.equal(trainer.model.lm_head.weight, expected.lm_head.weight)
    assert model_fingerprint(trainer.ref_model) != model_fingerprint(trainer.model)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k not in (RESPONSE_MASK, ROW_IDS)}
    got = trainer.reference_logps(trainer.model, inputs, batch[RESPONSE_MASK])
    with torch.no_grad():
        want = response_logps(expected, expected.get_output_embeddings(), inputs, batch[RESPONSE_MASK])
        policy = response_logps(trainer.model, trainer.model.get_output_embeddings(), inputs, batch[RESPONSE_MASK])
    torch.testing.assert_close(got.sums, want.sums, rtol=0, atol=1e-5)
    assert (got.sums - policy.sums).abs().min() > 1e-3


@pytest.mark.parametrize("multimodal", [False, True])
def test_log_prob_settings_change_the_key(multimodal, tiny_llama, tiny_idefics3) -> None:
    """Each collator setting that changes the encoded sides, and mixed precision, change the cache key."""
    path = tiny_idefics3 if multimodal else tiny_llama
    _, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(path)))
    base = dict(multimodal=multimodal)
    variants = [dict(multitask=True), dict(pad_to_multiple_of=8)]
    if multimodal:
        variants += [dict(max_image_size=16), dict(separate_images=False),
                     dict(image_processor_kwargs={"do_normalize": False})]
    keys = {cache_key("m", "d", log_prob_settings(ADPOCollator(processor, **base, **v), "no"))
            for v in [{}, *variants]}
    keys.add(cache_key("m", "d", log_prob_settings(ADPOCollator(processor, **base), "bf16")))
    keys |= {cache_key("m2", "d", {}), cache_key("m", "d2", {})}
    assert len(keys) == len(variants) + 4
    again = cache_key("m", "d", log_prob_settings(ADPOCollator(processor, **base), "no"))
    assert again in keys  # deterministic


def test_dataset_fingerprint_covers_text_and_image_bytes(tmp_path) -> None:
    from datasets import Dataset

    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(image)
    rows = [{"response": "r", "chosen": "c", "rejected": "x", "chosen_images": [str(image)], ROW_ID: 0}]
    first = dataset_fingerprint(Dataset.from_list(rows))
    assert dataset_fingerprint(Dataset.from_list(rows)) == first
    assert dataset_fingerprint(Dataset.from_list([{**rows[0], "response": "s"}])) != first
    Image.new("RGB", (4, 4), (254, 0, 0)).save(image)
    assert dataset_fingerprint(Dataset.from_list(rows)) != first
    pil = [{**rows[0], "chosen_images": [Image.new("RGB", (4, 4), c)]} for c in ((0, 0, 0), (0, 0, 1))]
    assert dataset_fingerprint(Dataset.from_list(pil[:1])) != dataset_fingerprint(Dataset.from_list(pil[1:]))


def test_reference_columns_reach_the_batch_side_major_and_stale_ones_are_refused(tiny_llama, text_jsonl) -> None:
    """The joined columns (rows, sides) become the batch's (sides·rows,) layout [side 0 of each row; side 1 ...];
    columns whose token counts differ from the batch's (other data or settings) are refused."""
    from datasets import Dataset

    _, tokenizer = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny_llama)))
    rows = load_adpo_dataset(str(text_jsonl)).select(range(2))
    collator = ADPOCollator(tokenizer, multimodal=False)
    counts = collator([rows[0], rows[1]])[RESPONSE_MASK].sum(1).view(2, 2).T  # (rows, sides)
    joined = with_reference_columns(rows, RefLogpsTable(torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), counts))
    batch = collator([joined[1], joined[0]])
    assert batch[REF_LOGPS].tolist() == [-3.0, -1.0, -4.0, -2.0]
    reference = PrecomputedReference(LiveReference(None), cache=None, compute=None)
    mask = batch[RESPONSE_MASK]
    got = reference.logps(None, {}, mask, None, {REF_LOGPS: batch[REF_LOGPS], REF_COUNTS: batch[REF_COUNTS]})
    assert got.sums.tolist() == [-3.0, -1.0, -4.0, -2.0]
    with pytest.raises(RuntimeError, match="token counts differ"):
        reference.logps(None, {}, mask, None, {REF_LOGPS: batch[REF_LOGPS], REF_COUNTS: batch[REF_COUNTS] + 1})
    with pytest.raises(ValueError, match="no precomputed reference"):
        reference.logps(None, {}, mask, None, {})
    with pytest.raises(ValueError, match="3 rows for a dataset of 2"):
        with_reference_columns(Dataset.from_list([{"a": 1}, {"a": 2}]), RefLogpsTable(torch.zeros(3, 2),
                                                                                     torch.ones(3, 2).long()))


def _accelerator():
    return SimpleNamespace(num_processes=1, is_local_main_process=True, wait_for_everyone=lambda: None)


def test_damaged_cache_file_is_recomputed(tmp_path, caplog) -> None:
    """A file that is not a table, one bit flipped in a stored log-prob, or contents that do not match their stored
    checksum: each is refused with a log line naming the file, recomputed and rewritten."""
    table = RefLogpsTable(torch.tensor([[-1.2345678, -2.5]]), torch.tensor([[3, 4]]))
    path = tmp_path / "key.pt"
    meta = {"rows": 1}

    def recomputed() -> bool:
        caplog.clear()
        with caplog.at_level("WARNING", logger="adpo.refcache"):
            got, loaded = load_or_compute(path, _accelerator(), lambda: table, meta)
        assert torch.equal(got.sums, table.sums) and torch.equal(got.counts, table.counts)
        damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        assert (not loaded) == bool(damaged) and all(str(path) in m for m in damaged)
        return not loaded

    path.write_bytes(b"not a torch file")
    assert recomputed()
    assert not recomputed()  # the rewritten file is used
    data = bytearray(path.read_bytes())
    where = bytes(data).find(table.sums.numpy().tobytes())
    assert where >= 0
    data[where] ^= 0x01  # one bit of the first log-prob's mantissa
    path.write_bytes(bytes(data))
    assert recomputed()
    payload = torch.load(path, weights_only=True)
    payload["sums"] = payload["sums"] + 1.0  # a well-formed file whose checksum no longer matches
    torch.save(payload, path)
    assert recomputed()
    assert not recomputed()


def test_a_full_disk_while_writing_the_cache_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    """The write fails half-way (ENOSPC): no temporary or partial file is left, and the error says what to do."""
    import errno

    table = RefLogpsTable(torch.tensor([[-1.0, -2.0]]), torch.tensor([[1, 1]]))
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:10])  # half a file on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(ReferenceCacheError, match="No space left on device.*--ref_cache_dir"):
        table.save(tmp_path / "cache" / "key.pt", {})
    assert list((tmp_path / "cache").iterdir()) == []


def test_shards_are_equal_and_cover_every_row() -> None:
    for n, world in ((7, 2), (8, 4), (3, 4), (1, 2)):
        shards = [shard_indices(n, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert set().union(*shards) == set(range(n))


def test_evaluating_an_uncached_dataset_after_freeing_is_a_clear_error(tiny_llama, text_jsonl, tmp_path) -> None:
    train = load_adpo_dataset(str(text_jsonl))
    trainer, _, _ = make_trainer(tiny_llama, train, tmp_path, multimodal=False, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="pass every evaluation dataset"):
        trainer.evaluate(eval_dataset=train.select(range(2)))


@pytest.mark.slow
def test_two_process_precompute_matches_single_process(tiny_llama, text_jsonl, tmp_path) -> None:
    """Two DDP processes (gloo on CPU) each compute a shard; the gathered table written by the run equals a
    single process's table bit for bit, and a single-process run with the same model and data reuses it."""
    import os
    import subprocess
    import sys

    from adpo.cli import parse_args

    base = ["--model_name_or_path", str(tiny_llama), "--dataset_name", str(text_jsonl), "--use_cpu",
            "--report_to", "none", "--precompute_ref_log_probs", "--per_device_eval_batch_size", "3"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "adpo.cli"]
    proc = subprocess.run([*launch, *base, "--output_dir", str(tmp_path / "ddp"), "--ref_cache_dir",
                           str(tmp_path / "ddp_cache"), "--max_steps", "1", "--save_strategy", "no"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "ddp_cache").glob("*.pt")

    reused, _ = build_trainer(*parse_args([*base, "--output_dir", str(tmp_path / "a"), "--ref_cache_dir",
                                           str(tmp_path / "ddp_cache")]))
    assert reused.reference.cache_hits == 1
    single, _ = build_trainer(*parse_args([*base, "--output_dir", str(tmp_path / "b"), "--ref_cache_dir",
                                           str(tmp_path / "single_cache")]))
    assert single.reference.cache_hits == 0
    (computed,) = (tmp_path / "single_cache").glob("*.pt")
    assert computed.name == written.name
    a, b = RefLogpsTable.load(written), RefLogpsTable.load(computed)
    assert a.sums.shape == (8, 2)
    assert torch.equal(a.sums, b.sums) and torch.equal(a.counts, b.counts)
