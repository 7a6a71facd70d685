"""The eval stage's two measures computed the plain way, each on its own: the reference that
qlora_ray.quality.scoring.score (both at once, each prompt run once) is checked against."""

from __future__ import annotations

import time

from qlora_ray.data import prompt_and_reference
from qlora_ray.quality.scoring import Accuracy, Perplexity, tokens_until_eos, answer_token_spans, render_prompt
from qlora_ray.scorers import SCORERS


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
            generated += tokens_until_eos(new_tokens, tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = pad_side
    return answers, generated


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
