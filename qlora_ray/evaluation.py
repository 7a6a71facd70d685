"""Exact-match accuracy of a model on a tenant's eval rows: batched greedy generation, then the scorer.

Chat prompts go through the base's chat template with the generation prompt appended; plain
string prompts are fed as they are (that is how such rows were trained). Batches are left-padded
so every row's answer starts right after its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlora_ray.data import prompt_and_reference
from qlora_ray.scorers import SCORERS


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    answers: list[str]

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_model(base_dir: Path, adapter_dir: Path | None = None, *, dtype: str = "bfloat16"):
    """The 16-bit base, with an adapter attached unmerged through peft when adapter_dir is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype), use_safetensors=True)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def render_prompt(tokenizer, prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def generate_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int = 25) -> list[str]:
    """Greedy answers, one per prompt, without the prompt and special tokens."""
    import torch

    texts = [render_prompt(tokenizer, p) for p in prompts]
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = pad_side
    return answers


def exact_match(model, tokenizer, rows: list[dict], scorer: str, *, batch_size: int = 25) -> Accuracy:
    """Fraction of rows whose greedy answer the tenant's scorer accepts."""
    prompts, references = zip(*(prompt_and_reference(row) for row in rows))
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    answers = generate_answers(model, tokenizer, list(prompts), max_new_tokens=longest + 8, batch_size=batch_size)
    score = SCORERS[scorer]
    correct = sum(score(answer, reference) for answer, reference in zip(answers, references))
    return Accuracy(correct=correct, total=len(rows), answers=answers)
