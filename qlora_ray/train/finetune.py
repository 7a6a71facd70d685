"""One tenant's QLoRA (or LoRA) fine-tune, on local files: no Ray and no store in here.

The frozen base is loaded 4-bit (bitsandbytes NF4/FP4, double quantization) or 16-bit; peft adds
the LoRA layers; TRL's SFTTrainer trains them with the loss on the completion only. Chat rows
`{"messages": [..., assistant]}` become conversational prompt/completion rows (the prompt is every
message before the last, the completion the final assistant answer), so one loss rule, TRL's
completion-only loss, covers every supported data shape and any chat template.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora_ray import hardware
from qlora_ray.library_output import route_library_output
from qlora_ray.spec import LoraSpec, TrainSpec

ProgressFn = Callable[[dict], None]
CheckpointFn = Callable[[int, Path], None]


@dataclass(frozen=True)
class FinetuneResult:
    adapter_dir: Path
    metrics: dict


def to_sft_rows(rows: list[dict]) -> list[dict]:
    """Chat rows -> conversational prompt/completion; prompt/completion rows pass through."""
    converted = []
    for row in rows:
        if "messages" in row:
            converted.append({"prompt": row["messages"][:-1], "completion": row["messages"][-1:]})
        else:
            converted.append(row)
    return converted


def load_base_for_training(base_dir: Path, spec: TrainSpec, device: str):
    """The frozen base, 4-bit or 16-bit, ready for k-bit training. Returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    compute_dtype = hardware.compute_dtype(device)  # bf16 where native: a GPU's rate, and bnb's CPU kernels
    kwargs: dict = {"dtype": compute_dtype, "use_safetensors": True, "trust_remote_code": False}
    if spec.quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if spec.quantization == "none" and device == "cuda":
        model = model.to(device)
    # Training needs no KV cache, and transformers keeps packed rows apart (a block-diagonal mask
    # from the restarting position_ids) only when there is none.
    model.config.use_cache = False
    disable_bnb_cpu_inference_repack(model)
    return model, tokenizer


def disable_bnb_cpu_inference_repack(model) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPUs with AVX512-BF16.

    bitsandbytes 0.50.2 repacks a Linear4bit's weight into a CPU inference layout on its first
    eval-mode forward (trainer.evaluate(), generate()). From then on it calls gemv_4bit, which has
    no autograd: QLoRA silently stops learning. Turning the repack off keeps the trainable path.
    Returns the number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def fused_kernels_available() -> bool:
    from importlib.util import find_spec

    return find_spec("liger_kernel") is not None


def decoder_layers(model) -> list:
    """The model's decoder layers (the ModuleList of checkpointable blocks), through any peft wrapper."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and isinstance(module[0], GradientCheckpointingLayer):
            return list(module)
    return []


def configure_layers(model, *, uncheckpointed_layers: int, compile_layers: bool) -> None:
    """Per-layer speed settings, applied once gradient checkpointing is on.

    The last `uncheckpointed_layers` layers keep their activations (no recompute in the backward
    pass); with compile_layers each layer is compiled by torch.compile (identical layers share
    one compiled graph). What each buys is in benchmarks/results/.
    """
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if uncheckpointed_layers and index >= len(layers) - uncheckpointed_layers:
            layer.gradient_checkpointing = False
        if compile_layers:
            layer.compile()


def resolve_optimizer(spec: TrainSpec, device: str) -> str:
    if spec.optimizer != "auto":
        return spec.optimizer
    # paged 8-bit AdamW needs CUDA; on the CPU, torch's AdamW.
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def finetune(
    spec: TrainSpec,
    base_dir: Path,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    work_dir: Path,
    *,
    resume_from: Path | None = None,
    on_progress: ProgressFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    base_model_name: str | None = None,
) -> FinetuneResult:
    """Train one adapter. Checkpoints land in work_dir/checkpoints; the adapter in work_dir/adapter.

    on_checkpoint(step, dir) is called after each checkpoint is saved (the caller uploads it);
    on_progress(dict) after each logged step. resume_from continues a previous run's checkpoint.
    base_model_name is recorded in adapter_config.json instead of the local folder trained from.
    """
    route_library_output()
    device = hardware.preferred_device()
    started = time.perf_counter()
    model, tokenizer = load_base_for_training(base_dir, spec, device)
    loaded = time.perf_counter()
    use_liger = resolve_fused_kernels(spec, device)
    config = sft_config(spec, device, work_dir / "checkpoints", use_liger=use_liger)
    trainer = build_trainer(spec, device, model, tokenizer, config, sft_datasets(train_rows, eval_rows),
                            on_progress=on_progress, on_checkpoint=on_checkpoint)
    prepared = time.perf_counter()
    run = run_training(trainer, device, resume_from)
    metrics = collect_metrics(trainer, run, spec, device, use_liger=use_liger, resume_from=resume_from,
                              evaluate=bool(eval_rows))
    # What a task spends outside the training loop: on a small model a large share of its time.
    metrics.update(load_seconds=round(loaded - started, 2), setup_seconds=round(prepared - loaded, 2))
    adapter_dir = save_adapter(trainer.model, work_dir / "adapter", base_model_name)
    return FinetuneResult(adapter_dir=adapter_dir, metrics=metrics)


def resolve_fused_kernels(spec: TrainSpec, device: str) -> bool:
    """Whether Liger's fused kernels run: asked for, on a GPU, and installed. Asked for but not installed
    warns rather than fails: the kernels save time and memory, and the run works without them."""
    use_liger = spec.fused_kernels and device == "cuda" and fused_kernels_available()
    if spec.fused_kernels and device == "cuda" and not use_liger:
        # stacklevel 3: the warning names finetune()'s caller, past this helper and finetune()
        warnings.warn("train.fused_kernels is on but liger-kernel is not installed (pip install 'qlora-ray[gpu]'); "
                      "training without the fused kernels", stacklevel=3)
    return use_liger


def sft_config(spec: TrainSpec, device: str, checkpoints: Path, *, use_liger: bool):
    """Every Trainer setting in one place, from the spec and the device: checkpoints every
    spec.checkpoint_every steps in `checkpoints` (only the newest kept), a log line every step."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
        max_steps=spec.max_steps if spec.max_steps is not None else -1,
        num_train_epochs=spec.epochs if spec.epochs is not None else 1.0,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a fraction of the steps in transformers 5
        optim=resolve_optimizer(spec, device),
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        max_length=spec.seq_len,
        packing=spec.packing,
        completion_only_loss=True,
        seed=spec.seed,
        data_seed=spec.seed,
        save_strategy="steps",
        save_steps=spec.checkpoint_every,
        save_total_limit=1,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_liger_kernel=use_liger,
    )


def lora_config(lora: LoraSpec):
    """The LoRA layers peft adds to the frozen base; the base's biases stay frozen too."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_datasets(train_rows: list[dict], eval_rows: list[dict] | None):
    """(train, eval) Datasets in TRL's prompt/completion shape; eval is None when there are no eval rows."""
    from datasets import Dataset

    return Dataset.from_list(to_sft_rows(train_rows)), Dataset.from_list(to_sft_rows(eval_rows)) if eval_rows else None


def build_trainer(spec: TrainSpec, device: str, model, tokenizer, config, datasets, *,
                  on_progress: ProgressFn | None, on_checkpoint: CheckpointFn | None):
    """The SFTTrainer with LoRA attached. Progress and checkpoints reach the caller through its
    functions, so the Trainer's own printing of raw log dicts is removed."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    train_dataset, eval_dataset = datasets
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(spec.lora),
        callbacks=[_Reporter(on_progress, on_checkpoint), _LayerSettings(spec, device)],
    )
    disable_bnb_cpu_inference_repack(trainer.model)
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclass(frozen=True)
class TrainingRun:
    """What one trainer.train() call leaves behind that the Trainer's state does not record."""

    training_loss: float
    seconds: float
    tokens: int  # this attempt's tokens only: a resumed state also counts the earlier attempts'


def run_training(trainer, device: str, resume_from: Path | None) -> TrainingRun:
    """Train, from resume_from when given. Checkpoints come from the store, so every load is weights-only."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens_before = _tokens_at(resume_from)  # read now: the Trainer rotates old checkpoints away
    started = time.perf_counter()
    with weights_only_loads():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    return TrainingRun(
        training_loss=float(output.training_loss),
        seconds=seconds,
        tokens=int(trainer.state.num_input_tokens_seen) - tokens_before,
    )


def collect_metrics(trainer, run: TrainingRun, spec: TrainSpec, device: str, *, use_liger: bool,
                    resume_from: Path | None, evaluate: bool) -> dict:
    """The run's summary. Peak memory is read last, so that evaluation's peak counts too."""
    import torch

    state = trainer.state
    losses = _losses(state.log_history)
    metrics = {
        "train_loss": round(run.training_loss, 5),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0), 4),
        "train_seconds": round(run.seconds, 2),
        "tokens_seen": run.tokens,
        "tokens_per_second": round(run.tokens / run.seconds, 1) if run.seconds > 0 else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "optimizer": trainer.args.optim if isinstance(trainer.args.optim, str) else trainer.args.optim.value,
        "resumed_from_step": _step_of(resume_from),
        "fused_kernels": use_liger,
        "compiled_layers": spec.compile_layers and device == "cuda",
    }
    if evaluate:
        metrics["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 5)
    metrics["peak_memory_bytes"] = hardware.peak_memory_bytes(device)
    return metrics


def save_adapter(model, adapter_dir: Path, base_model_name: str | None) -> Path:
    """Write the LoRA weights and config; base_model_name, when given, replaces the local base folder's path."""
    if base_model_name:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_model_name
    model.save_pretrained(str(adapter_dir))
    return adapter_dir


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load in the block refuses what is not tensors and plain containers, whatever its
    caller passes: resuming reads the optimizer, scheduler and RNG states from a checkpoint in the
    store, which is as untrusted as an adapter. transformers passes weights_only=True already; this
    makes it hold for every library on the path, and against TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _losses(history: list[dict]) -> list[float]:
    return [round(float(entry["loss"]), 5) for entry in history if "loss" in entry]


def _tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def _step_of(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    return int(checkpoint.name.rsplit("-", 1)[-1])


class _Reporter:
    """TrainerCallback that forwards logs and finished checkpoints to the caller's functions."""

    def __new__(cls, on_progress: ProgressFn | None, on_checkpoint: CheckpointFn | None):
        from transformers import TrainerCallback

        class Reporter(TrainerCallback):
            def __init__(self):
                self.last_time, self.last_tokens = time.perf_counter(), 0

            def on_train_begin(self, args, state, control, **kwargs):
                # a resumed state already counts the earlier attempts' tokens
                self.last_time, self.last_tokens = time.perf_counter(), int(state.num_input_tokens_seen)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if on_progress is None or not logs or "loss" not in logs:
                    return
                now = time.perf_counter()
                tokens = int(state.num_input_tokens_seen)
                rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_time, self.last_tokens = now, tokens
                loss = logs["loss"]
                on_progress({
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "loss": None if loss is None or math.isnan(loss) else round(float(loss), 5),
                    "tokens_per_second": round(rate, 1),
                })

            def on_save(self, args, state, control, **kwargs):
                # the Trainer also saves at the last step; the adapter is published right after instead
                if on_checkpoint is not None and state.global_step < state.max_steps:
                    on_checkpoint(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")

        return Reporter()


class _LayerSettings:
    """TrainerCallback: per-layer checkpointing and compilation, once the Trainer has set up the model."""

    def __new__(cls, spec: TrainSpec, device: str):
        from transformers import TrainerCallback

        class LayerSettings(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                configure_layers(
                    model,
                    uncheckpointed_layers=spec.uncheckpointed_layers if spec.gradient_checkpointing else 0,
                    compile_layers=spec.compile_layers and device == "cuda",
                )

        return LayerSettings()
