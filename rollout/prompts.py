"""Prompt files for `switchkd generate`: JSONL with a "prompt" field and an optional "response"
(the reference answer, for the trainer's SFT term); bad rows skipped and counted."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class PromptError(ValueError):
    """A prompt file that cannot be used at all; the message names the file."""


def read_prompt_jsonl(path: str | Path, max_prompts: int | None = None
                      ) -> tuple[list[tuple[int, str, str | None]], Counter]:
    """(line index, prompt text, response text or None) for every good row, and a Counter of
    skip reasons for bad ones."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"data.prompts={path}: file does not exist")
    good, skipped = [], Counter()
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if max_prompts is not None and len(good) >= max_prompts:
                break
            reason = None
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reason = "not UTF-8"
            except json.JSONDecodeError:
                reason = "blank line" if not raw.strip() else "not JSON"
            else:
                prompt = row.get("prompt") if isinstance(row, dict) else None
                if not isinstance(row, dict):
                    reason = "not a JSON object"
                elif "prompt" not in row:
                    reason = "missing 'prompt'"
                elif not isinstance(prompt, str):
                    reason = "'prompt' is not a string"
                elif not prompt.strip():
                    reason = "empty 'prompt'"
                elif row.get("response") is not None and not isinstance(row["response"], str):
                    reason = "'response' is not a string"
            if reason:
                skipped[reason] += 1
            else:
                good.append((index, prompt, row.get("response")))
    return good, skipped
