"""Stage `tokenizer`: train a byte-level BPE tokenizer (HF `tokenizers`) on the train split
of stage `data`, save it in Hugging Face format with BOS/EOS/PAD and the project's one chat
template, then tokenize and pack both splits into fixed-length sequences on Ray Data,
written as parquet shards with an `index.json` that the training stages read.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from cluster.config import StrictModel
from cluster.manifest import atomic_write_text
from cluster.stage import Stage, StageContext, StageResult

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
# ChatML: the one chat template, used by SFT, RLHF, evaluation and serving alike.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(default=4096, ge=300, le=1_000_000)
    min_frequency: int = Field(default=2, ge=1)
    seq_len: int = Field(default=256, ge=8, description="tokens per packed training sequence")
    max_train_bytes: int = Field(default=200 << 20, ge=1, description="text fed to the BPE trainer, at most")
    docs_per_batch: int = Field(default=256, ge=1)


def _train_texts(documents_dir: Path, max_bytes: int):
    """Stream the train split's texts from parquet, up to `max_bytes` of text."""
    import pyarrow.dataset as pads

    seen = 0
    dataset = pads.dataset(str(documents_dir), format="parquet")
    for batch in dataset.to_batches(columns=["text"], filter=pads.field("split") == "train", batch_size=256):
        for text in batch.column("text").to_pylist():
            yield text
            seen += len(text)
            if seen >= max_bytes:
                return


def train_tokenizer(texts, config: TokenizerConfig, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


def run(ctx: StageContext, config: TokenizerConfig) -> StageResult:
    import ray.data
    from ray.data.expressions import col

    from data_jobs.corpus_stage import write_fresh
    from data_jobs.packing import tokenize_and_pack

    documents_dir = ctx.upstream_output("data", "documents")
    tokenizer_dir = ctx.stage_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        print("aero: tokenizer: training byte-level BPE", flush=True)
        train_tokenizer(_train_texts(documents_dir, config.max_train_bytes), config, tokenizer_dir)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    docs = ray.data.read_parquet(str(documents_dir)).select_columns(["text", "split"])
    index = {
        "seq_len": config.seq_len, "vocab_size": len(hf), "bos_id": hf.bos_token_id,
        "eos_id": hf.eos_token_id, "pad_id": hf.pad_token_id, "tokenizer": str(tokenizer_dir), "splits": {},
    }
    for split in ("train", "val"):
        out = ctx.stage_dir / "shards" / split
        packed = docs.filter(expr=col("split") == split).map_batches(
            tokenize_and_pack, batch_size=config.docs_per_batch, batch_format="pandas",
            fn_kwargs={"tokenizer_path": str(tokenizer_dir), "seq_len": config.seq_len},
        ).materialize()
        totals = packed.sum(["batch_tokens", "batch_dropped", "batch_docs"]) if packed.count() else {}
        shards = packed.filter(expr=col("is_totals") == 0).select_columns(["input_ids"])
        write_fresh(out, shards.write_parquet)
        sequences = shards.count()
        if sequences == 0:
            raise RuntimeError(
                f"split {split!r} packed into 0 sequences of {config.seq_len} tokens: the corpus is too "
                "small for this seq_len or val_fraction (lower tokenizer.seq_len or raise data.val_fraction)"
            )
        index["splits"][split] = {
            "path": str(out),
            "files": sorted(p.name for p in out.glob("*.parquet")),
            "sequences": sequences,
            "documents": int(totals.get("sum(batch_docs)", 0)),
            "tokens": int(totals.get("sum(batch_tokens)", 0)),
            "tokens_dropped": int(totals.get("sum(batch_dropped)", 0)),
        }
        print(f"aero: tokenizer: {split}: {sequences} sequences of {config.seq_len} tokens", flush=True)
    atomic_write_text(ctx.stage_dir / "index.json", json.dumps(index, indent=2) + "\n")
    stats = {
        "vocab_size": index["vocab_size"],
        "tokens_out": sum(s["tokens"] for s in index["splits"].values()),
        "sequences": {k: v["sequences"] for k, v in index["splits"].items()},
        "tokens_dropped": sum(s["tokens_dropped"] for s in index["splits"].values()),
    }
    atomic_write_text(ctx.stage_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return StageResult(
        outputs={"tokenizer": tokenizer_dir, "shards": ctx.stage_dir / "shards", "index": ctx.stage_dir / "index.json"},
        metrics=stats,
    )


STAGE = Stage(
    name="tokenizer",
    config_model=TokenizerConfig,
    run=run,
    needs=("data",),
    description="train a byte-level BPE tokenizer; tokenize and pack shards with Ray Data",
)
