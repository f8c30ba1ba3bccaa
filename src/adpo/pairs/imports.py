"""Other tools' rows → ours.

- ms-swift (``messages`` + ``images``, with ``rejected_images`` and/or ``rejected_messages`` for a pair whose
  other prompt shows other pictures or says other words): one ADPO row each.
- LLaVA / ShareGPT conversations (``conversations``: ``[{"from": "human"|"gpt"|..., "value": ...}]`` with
  ``image``/``images``) and ms-swift rows without a rejected side: one ``(images, prompt, response)`` row per
  question-answer turn, the input ``adpo-data swap`` / ``prompt-swap`` build pairs from.

``<image>`` placeholders are removed from the text (the collator places each side's images in the model's own
template). A row whose placeholders do not match its images, or that has no answer, is refused with its row
and field named, or counted with ``--on_bad_rows skip``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from ..data import ADPODataError
from .build import BuildReport
from .io import Source, image_payload, row_image_list

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?", re.IGNORECASE)
USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model"}
SYSTEM_ROLES = {"system"}


def detect_format(source: Source) -> str:
    """``swift-pairs`` (ms-swift rows with a rejected side), ``swift`` (ms-swift without one) or ``llava``."""
    columns = set(source.columns)
    if "messages" in columns:
        return "swift-pairs" if columns & {"rejected_images", "rejected_messages"} else "swift"
    if "conversations" in columns:
        return "llava"
    raise ADPODataError(None, "messages", f"{source.name} has neither 'messages' (ms-swift) nor 'conversations' "
                        f"(LLaVA/ShareGPT) (columns: {source.columns})")


def _turns(value: Any, row: int, field: str) -> list[tuple[str, str]]:
    """A conversation as (role, text) pairs, roles lower-cased (ShareGPT ``from``/``value`` or ``role``/``content``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ADPODataError(row, field, f"does not parse as a JSON list of turns: {err.msg}") from None
    if not isinstance(value, list) or not value:
        raise ADPODataError(row, field, "must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ADPODataError(row, field, f"turn {k} is a {type(turn).__name__}, not an object")
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if isinstance(text, list):  # OpenAI-style content parts: keep the text parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(role, str) or not isinstance(text, str):
            raise ADPODataError(row, field, f"turn {k} needs a role ('role'/'from') and a text ('content'/'value')")
        turns.append((role.lower(), text))
    return turns


def strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub("", text).strip()


def _single_turn(turns: list[tuple[str, str]], row: int, field: str) -> tuple[str, str]:
    """(prompt, response) of a one-question conversation (a system turn is put before the question)."""
    system = [t for r, t in turns if r in SYSTEM_ROLES]
    rest = [(r, t) for r, t in turns if r not in SYSTEM_ROLES]
    if len(rest) != 2 or rest[0][0] not in USER_ROLES or rest[1][0] not in ASSISTANT_ROLES:
        roles = [r for r, _ in rest]
        raise ADPODataError(row, field, f"an ADPO row holds one question and its answer; this conversation has "
                            f"turns {roles}")
    prompt = "\n\n".join([*system, rest[0][1]])
    return prompt, rest[1][1]


def _placeholders_match(text: str, n_images: int, row: int, field: str) -> None:
    n = len(re.findall(r"<image>", text, re.IGNORECASE))
    if n and n != n_images:
        raise ADPODataError(row, field, f"has {n} <image> placeholder(s) but the row has {n_images} image(s)")


def _images(source: Source, row: dict[str, Any], field: str, index: int) -> list[tuple[bytes, str]]:
    return [image_payload(v, source.image_root, index, field) for v in row_image_list(row, field, index)]


def swift_pair(source: Source, row: dict[str, Any], i: int) -> dict[str, Any]:
    """One ms-swift row with a rejected side → one ADPO row."""
    prompt, response = _single_turn(_turns(row["messages"], i, "messages"), i, "messages")
    images = _images(source, row, "images", i)
    _placeholders_match(prompt, len(images), i, "messages")
    rejected_prompt = prompt
    if row.get("rejected_messages"):
        rejected_prompt, rejected_response = _single_turn(_turns(row["rejected_messages"], i, "rejected_messages"),
                                                          i, "rejected_messages")
        if rejected_response.strip() != response.strip():
            raise ADPODataError(i, "rejected_messages", "answers differently from 'messages': an ADPO pair keeps "
                                "one response (for a preference between two answers use adpo-data from-dpo)")
    rejected_images = _images(source, row, "rejected_images", i) if row.get("rejected_images") else images
    _placeholders_match(rejected_prompt, len(rejected_images), i, "rejected_messages")
    if rejected_images == images and strip_placeholders(rejected_prompt) == strip_placeholders(prompt):
        raise ADPODataError(i, "rejected_images", "the rejected side equals the chosen one (same text and images)")
    return {"response": response, "chosen": strip_placeholders(prompt), "chosen_images": images,
            "rejected": strip_placeholders(rejected_prompt), "rejected_images": rejected_images, "source_row": i}


def conversation_rows(source: Source, row: dict[str, Any], i: int, field: str, image_field: str,
                      ) -> list[dict[str, Any]]:
    """One (images, prompt, response) row per question-answer turn; a system turn leads each prompt."""
    turns = _turns(row[field], i, field)
    images = _images(source, row, image_field, i) if image_field else []
    system = [t for r, t in turns if r in SYSTEM_ROLES]
    rest = [(r, t) for r, t in turns if r not in SYSTEM_ROLES]
    out = []
    for k in range(0, len(rest) - 1, 2):
        (role_q, question), (role_a, answer) = rest[k], rest[k + 1]
        if role_q not in USER_ROLES or role_a not in ASSISTANT_ROLES:
            raise ADPODataError(i, field, f"turns {k} and {k + 1} are {role_q!r}, {role_a!r}, not a question and "
                                "its answer")
        out.append({"images": images, "prompt": strip_placeholders("\n\n".join([*system, question])),
                    "response": answer, "source_row": i, "turn": k // 2})
    if not out:
        raise ADPODataError(i, field, "has no question followed by an answer")
    all_placeholders = sum(len(re.findall(r"<image>", t, re.IGNORECASE)) for _, t in rest)
    if all_placeholders and all_placeholders != len(images):
        raise ADPODataError(i, field, f"has {all_placeholders} <image> placeholder(s) but the row has "
                            f"{len(images)} image(s)")
    return out


def import_rows(source: Source, on_bad_rows: str, report: BuildReport) -> tuple[str, Iterator[dict[str, Any]]]:
    """(what the rows become: ``pairs`` or ``swap input``, the rows); bad rows raise or are counted."""
    fmt = detect_format(source)
    image_field = next((c for c in ("images", "image") if c in source.columns), "")
    kind = "pairs" if fmt == "swift-pairs" else "swap input"

    def rows() -> Iterator[dict[str, Any]]:
        for k, row in enumerate(tqdm(source.rows(), total=len(source), desc=f"importing {fmt} rows", unit="row")):
            i = source.row_ids[k]  # the record's number in the input
            try:
                if fmt == "swift-pairs":
                    out = [swift_pair(source, row, i)]
                else:
                    out = conversation_rows(source, row, i, "messages" if fmt == "swift" else "conversations",
                                            image_field)
            except ADPODataError as err:
                if on_bad_rows == "error":
                    raise
                report.skip(f"{err.field}: {err.problem.split(':')[0]}", i)
                continue
            report.output_rows += len(out)
            yield from out

    return kind, rows()
