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
from pathlib import Path

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


def load_model(base_dir: Path, adapter_dir: Path | None = None, *, dtype: str = "bfloat16"):
    """The 16-bit base, with an adapter attached unmerged through peft when adapter_dir is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=False)
    if adapter_dir is not None:
        from peft import PeftModel

        from qlora_ray.adapter_files import checked_adapter_dir

        model = PeftModel.from_pretrained(model, str(checked_adapter_dir(adapter_dir)))
    model.eval()
    return model, tokenizer


def render_prompt(tokenizer, prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def generate_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int = 25) -> tuple[list[str], int]:
    """Greedy answers, one per prompt, without the prompt and special tokens; and the number of new
    tokens generated (each row's up to its first EOS)."""
    import torch

    texts = [render_prompt(tokenizer, p) for p in prompts]
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    generated = 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            generated += _tokens_until_eos(new_tokens, tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = pad_side
    return answers, generated


def _tokens_until_eos(new_tokens, eos_id: int | None) -> int:
    """New tokens per row up to and including the first EOS (generate pads finished rows after it)."""
    if eos_id is None:
        return new_tokens.numel()
    is_eos = new_tokens == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def exact_match(model, tokenizer, rows: list[dict], scorer: str, *, batch_size: int = 25) -> Accuracy:
    """Fraction of rows whose greedy answer the tenant's scorer accepts."""
    prompts, references = zip(*(prompt_and_reference(row) for row in rows))
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    started = time.perf_counter()
    answers, generated = generate_answers(model, tokenizer, list(prompts), max_new_tokens=longest + 8,
                                          batch_size=batch_size)
    seconds = time.perf_counter() - started
    score = SCORERS[scorer]
    correct = sum(score(answer, reference) for answer, reference in zip(answers, references))
    return Accuracy(correct=correct, total=len(rows), answers=answers, generated_tokens=generated, seconds=seconds)


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


def answer_perplexity(model, tokenizer, rows: list[dict], *, batch_size: int = 25) -> Perplexity:
    """Perplexity of the reference answers given their prompts (teacher-forced), over all answer
    tokens of all rows: exp(mean negative log-likelihood per answer token).

    Rows are left-padded, so every answer ends at the batch's last position and the LM head runs
    only over the last positions that predict an answer token (logits_to_keep): over the whole
    prompt it would cost more than the rest of the model on a small one."""
    import torch

    spans = answer_token_spans(tokenizer, rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    nll_sum, counted = 0.0, 0
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids, _ in batch], device=device)
        mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kept = max(len(ids) - prompt_len for ids, prompt_len in batch) + 1  # the last prompt token predicts the first answer token
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=kept).logits
        # logits[:, j] predicts token longest - kept + j + 1: the targets are the last kept - 1 tokens
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, longest - kept + 1:]
        token_nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
        answer_len = torch.tensor([len(ids) - prompt_len for ids, prompt_len in batch], device=device)
        scored = torch.arange(kept - 1, device=device)[None, :] >= (kept - 1 - answer_len)[:, None]
        nll_sum += float(token_nll[scored].double().sum())
        counted += int(scored.sum())
    return Perplexity(nll_sum=nll_sum, tokens=counted)


def score(model, tokenizer, rows: list[dict], scorer: str, *, batch_size: int = 25) -> tuple[Accuracy, Perplexity]:
    """exact_match and answer_perplexity together, with each batch's prompts run once.

    A prompt costs more than its answer (a tenant's system prompt and question against a short
    answer), and the two measures each ran it: here the prompts but their last token go into a KV
    cache that both continue from: the teacher-forced answers (from a copy) and greedy generation.
    Same results as the two functions (tests/test_eval.py checks), in about half the time."""
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
        generated += _tokens_until_eos(new_tokens, tokenizer.eos_token_id)
    judge = SCORERS[scorer]
    correct = sum(judge(answer, reference) for answer, reference in zip(answers, references))
    accuracy = Accuracy(correct=correct, total=len(rows), answers=answers, generated_tokens=generated, seconds=seconds)
    return accuracy, Perplexity(nll_sum=nll_sum, tokens=counted)
