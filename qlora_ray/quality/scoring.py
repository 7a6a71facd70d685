"""A model's quality on a tenant's eval rows: exact-match accuracy and the answers' perplexity.

Accuracy is batched greedy generation, then the tenant's scorer. Chat prompts go through the base's
chat template with the generation prompt appended; plain string prompts are fed as they are (that
is how such rows were trained). Batches are left-padded so every row's answer starts right after
its own prompt, and ends at the batch's last position when scored for perplexity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from qlora_ray.data import prompt_and_reference
from qlora_ray.scorers import SCORERS


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    answers: list[str]
    generated_tokens: int = 0  # new tokens generated for all rows, EOS included, padding not
    seconds: float = 0.0  # spent generating

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0


def render_prompt(tokenizer, prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def tokens_until_eos(new_tokens, eos_id: int | None) -> int:
    """New tokens per row up to and including the first EOS (generate pads finished rows after it)."""
    if eos_id is None:
        return new_tokens.numel()
    is_eos = new_tokens == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def answer_token_spans(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Each row as (token ids of prompt + reference answer, number of prompt tokens): the answer
    tokens are what perplexity is measured on, as the completion-only training loss was. Chat rows
    end with the template's end of turn; plain rows with the EOS token (as TRL appends it)."""
    spans = []
    for row in rows:
        prompt, reference = prompt_and_reference(row)
        prompt_text = render_prompt(tokenizer, prompt)
        if isinstance(prompt, str):
            full_text = prompt_text + reference + (tokenizer.eos_token or "")
        else:
            full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reference}],
                                                      tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise ValueError(f"the reference answer {reference[:40]!r} does not tokenize as a continuation of its prompt")
        spans.append((full_ids, len(prompt_ids)))
    return spans


@dataclass(frozen=True)
class Perplexity:
    nll_sum: float
    tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


def score(model, tokenizer, rows: list[dict], scorer: str, *, batch_size: int = 25) -> tuple[Accuracy, Perplexity]:
    """Exact-match accuracy (greedy answers, judged by the tenant's scorer) and the perplexity of the
    reference answers given their prompts (teacher-forced, over all answer tokens of all rows), with
    each batch's prompts run once.

    A prompt costs more than its answer (a tenant's system prompt and question against a short
    answer): the prompts but their last token go into a KV cache that both measures continue from,
    the teacher-forced answers (from a copy) and greedy generation. tests/reference_scoring.py
    measures each the plain way; tests/test_eval.py checks that both agree."""
    import copy

    import torch
    from transformers import DynamicCache

    spans = answer_token_spans(tokenizer, rows)
    references = [prompt_and_reference(row)[1] for row in rows]
    max_new_tokens = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references) + 8
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    generated, seconds, nll_sum, counted = 0, 0.0, 0.0, 0
    for start in range(0, len(spans), batch_size):
        prompts = [ids[:length] for ids, length in spans[start:start + batch_size]]
        targets = [ids[length:] for ids, length in spans[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        started = time.perf_counter()
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            if width > 1:
                model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill_seconds = time.perf_counter() - started
            # the answers, teacher-forced: the last prompt token predicts the first answer token
            answer_width = max(len(t) for t in targets)
            forced = torch.tensor([[p[-1]] + t + [pad_id] * (answer_width - len(t)) for p, t in zip(prompts, targets)],
                                  device=device)
            forced_mask = torch.tensor([[1] * (1 + len(t)) + [0] * (answer_width - len(t)) for t in targets], device=device)
            logits = model(input_ids=forced, attention_mask=torch.cat([mask[:, :-1], forced_mask], dim=1),
                           position_ids=positions[:, -1:] + torch.arange(answer_width + 1, device=device),
                           past_key_values=copy.deepcopy(cache), use_cache=True).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_nll = -log_probs.gather(-1, forced[:, 1:, None]).squeeze(-1)
            scored = forced_mask[:, 1:].bool()
            nll_sum += float(token_nll[scored].double().sum())
            counted += int(scored.sum())
            started = time.perf_counter()
            output = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        seconds += prefill_seconds + time.perf_counter() - started
        new_tokens = output[:, width:]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        generated += tokens_until_eos(new_tokens, tokenizer.eos_token_id)
    judge = SCORERS[scorer]
    correct = sum(judge(answer, reference) for answer, reference in zip(answers, references))
    accuracy = Accuracy(correct=correct, total=len(rows), answers=answers, generated_tokens=generated, seconds=seconds)
    return accuracy, Perplexity(nll_sum=nll_sum, tokens=counted)
