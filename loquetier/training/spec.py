"""`TrainSpec`: everything a fine-tuning job is asked to do, as plain data (stored with the job)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..lora.adapter import LoraSpec


@dataclass
class TrainSpec:
    """A LoRA fine-tuning job: adapter shape, data, optimisation and checkpointing."""

    name: str                                  # adapter name served when the job succeeds
    train_file: str                            # JSONL (messages | prompt/completion | alpaca | text)
    output_dir: str                            # checkpoints and the final adapter go here
    lora: LoraSpec = field(default_factory=LoraSpec)
    base_adapter: str | None = None            # continue training this loaded adapter instead of a new one
    eval_file: str | None = None
    eval_split: float = 0.0                    # share of train_file held out for eval when no eval_file
    epochs: int = 1
    max_steps: int | None = None               # optimizer steps; wins over epochs
    micro_batch_size: int = 1                  # examples per micro-batch (unless micro_batch_tokens)
    # a token budget per micro-batch: examples are packed first-fit into it, no padding
    # (training/packing.py); micro_batch_size is then not used
    micro_batch_tokens: int | None = None
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_schedule: str = "linear"                # linear | cosine | constant
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_interval: int | None = None           # optimizer steps between evaluations
    checkpoint_interval: int | None = None     # optimizer steps between checkpoints
    max_seq_len: int = 1024
    overlong: str = "truncate"                 # truncate | reject

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        d = dict(d)
        d["lora"] = LoraSpec(**d["lora"]) if isinstance(d.get("lora"), dict) else d.get("lora", LoraSpec())
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def validate(self) -> None:
        from ..errors import RequestError
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise RequestError(f"lr_schedule must be linear, cosine or constant, not {self.lr_schedule!r}")
        for key in ("epochs", "micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise RequestError(f"{key} must be at least 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise RequestError("micro_batch_tokens must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise RequestError("max_steps must be at least 1")
        if not self.learning_rate > 0:
            raise RequestError("learning_rate must be > 0")
        if not 0 <= self.eval_split < 1:
            raise RequestError("eval_split must be in [0, 1)")
        if not 0 <= self.lora.lora_dropout < 1:
            raise RequestError("lora dropout must be in [0, 1)")
        if self.lora.r < 1:
            raise RequestError("LoRA rank r must be at least 1")
