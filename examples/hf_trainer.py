"""Online data mixing with a Hugging Face ``Trainer``, on real tokenized text, end to end, on a CPU.

    text domains (JSONL) → a BPE tokenizer trained here (``tokenizers``) → ``datasets`` of token sequences
    → ``odm.MixtureLoader`` → ``OnlineMixingTrainer`` (a tiny GPT-2 from a config) → held-out loss per domain
    and the proportions plot

Needs ``pip install 'torch-odm[hf]'`` (and matplotlib for the plot). The domains are small JSONL files this
script writes (``prose``, ``code``, ``arithmetic``, and ``noise`` — random characters, which no model can
learn); ``--corpus DIR`` reads ``DIR/<domain>/train.jsonl`` instead (the benchmark corpus:
``python benchmarks/corpus.py --max-mb 5``). One to five minutes on 2 shared CPU cores with the defaults; ``--steps 10``
for a smoke run.

    python examples/hf_trainer.py --out /tmp/odm-hf
    python examples/hf_trainer.py --out /tmp/odm-hf --resume   # continues from the last checkpoint exactly
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import odm
from odm.callbacks.transformers import OnlineMixingTrainer, causal_lm_sample_losses

SEQ_LEN = 64
PAD = "<pad>"


# -- 1. text domains -----------------------------------------------------------------------------------------
def write_domains(folder: Path, *, docs: int = 600, seed: int = 0) -> dict[str, Path]:
    """Four small JSONL domains of different learnability, ``{"text": ...}`` per line."""
    rng = random.Random(seed)
    nouns = ["model", "river", "garden", "teacher", "engine", "letter", "market", "window", "forest", "song"]
    verbs = ["finds", "builds", "carries", "watches", "follows", "opens", "paints", "remembers"]
    adjectives = ["quiet", "bright", "old", "small", "careful", "distant", "green", "patient"]

    def prose() -> str:
        return " ".join(
            f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} a {rng.choice(nouns)}."
            for _ in range(rng.randint(2, 5))
        )

    def code() -> str:
        name, arg = rng.choice(nouns), rng.choice(["x", "n", "items", "value"])
        op = rng.choice(["+ 1", "* 2", "- 3", "// 2"])
        return f"def {name}_{rng.randint(0, 99)}({arg}):\n    return {arg} {op}\n"

    def arithmetic() -> str:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return " ".join(f"{a + i} + {b} = {a + i + b}." for i in range(rng.randint(2, 4)))

    def noise() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 .") for _ in range(rng.randint(60, 160)))

    makers = {"prose": prose, "code": code, "arithmetic": arithmetic, "noise": noise}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in makers.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"text": make()}) + "\n" for _ in range(docs)))
    return paths


def corpus_domains(corpus: Path) -> dict[str, Path]:
    """``{domain: train.jsonl}`` of a corpus folder built by ``benchmarks/corpus.py``."""
    paths = {d.name: d / "train.jsonl" for d in sorted(corpus.iterdir()) if (d / "train.jsonl").is_file()}
    if not paths:
        raise FileNotFoundError(f"no <domain>/train.jsonl under {corpus} (build one: benchmarks/corpus.py)")
    return paths


def read_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with path.open() as f:
        for line in f:
            text = json.loads(line)["text"]
            if text.strip():
                texts.append(text)
            if len(texts) == limit:
                break
    return texts


# -- 2. a tokenizer, trained here ----------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE: every string encodes (no unknown token), merges learnt from these texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# -- 3. sequences: one `datasets.Dataset` per domain ---------------------------------------------------------
def tokenized(texts: list[str], tokenizer: Tokenizer) -> Dataset:
    """Each document as ``SEQ_LEN`` token ids (cut, or padded with ``<pad>``), torch-formatted."""
    pad = tokenizer.token_to_id(PAD)
    tokenizer.enable_truncation(SEQ_LEN)
    tokenizer.enable_padding(length=SEQ_LEN, pad_id=pad, pad_token=PAD)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    # NOTE: with_format("torch") makes rows tensors; unformatted rows are lists, which odm refuses to collate.
    return Dataset.from_dict({"input_ids": ids}).with_format("torch")


def make_collate(pad_id: int) -> Any:
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([r["input_ids"] for r in rows])
        mask = (ids != pad_id).long()
        labels = ids.masked_fill(mask == 0, -100)  # padding is not predicted: it weighs nothing in the feedback
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# -- 4. training ---------------------------------------------------------------------------------------------
def held_out_losses(model: torch.nn.Module, held_out: dict[str, Dataset], collate: Any) -> dict[str, float]:
    """Mean held-out loss per document (each its token mean) of each domain, via ``odm.stats.evaluate_domains``
    (which credits each loader to the domain it is keyed by)."""
    model.eval()
    batches = {d: [collate([ds[i] for i in range(j, min(j + 16, len(ds)))]) for j in range(0, len(ds), 16)]
               for d, ds in held_out.items()}  # fmt: skip

    def losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_sample_losses(out.logits, batch["labels"])[0]

    loss_sum, count = odm.stats.evaluate_domains(losses, batches)
    return {d: float(s / c) for d, s, c in zip(batches, loss_sum, count, strict=True)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("odm-hf-example"), help="checkpoints, plot, data")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--policy",
        default="exp3s-progress",
        help="an odm policy name; default: EXP3.S rewarded by learning progress. In a short run `noise` still "
        "gains (its loss falls too while the model learns its character set: 120 steps ended at p(noise) 0.59); "
        "compare --policy uniform",
    )
    parser.add_argument("--docs", type=int, default=400, help="documents per domain")
    parser.add_argument("--corpus", type=Path, help="a benchmark corpus folder instead of the generated domains")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    args = parser.parse_args(argv)

    paths = corpus_domains(args.corpus) if args.corpus else write_domains(args.out / "data", docs=args.docs)
    texts = {d: read_texts(p, args.docs) for d, p in paths.items()}
    tokenizer = train_tokenizer([t for ts in texts.values() for t in ts])
    split = {d: int(len(ts) * 0.9) for d, ts in texts.items()}
    train_sets = {d: tokenized(ts[: split[d]], tokenizer) for d, ts in texts.items()}
    held_out = {d: tokenized(ts[split[d] :], tokenizer) for d, ts in texts.items()}
    pad_id = tokenizer.token_to_id(PAD)
    collate = make_collate(pad_id)

    policy = odm.policies.EXP3S(reward="progress") if args.policy == "exp3s-progress" else args.policy
    loader = odm.MixtureLoader(train_sets, batch_size=8, policy=policy, seed=0, collate_fn=collate)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        str(args.out / "checkpoints"), max_steps=args.steps, learning_rate=2e-3, warmup_steps=10,
        gradient_accumulation_steps=args.accumulation, per_device_train_batch_size=8,
        logging_steps=max(1, args.steps // 10), save_steps=max(1, args.steps // 2), report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = OnlineMixingTrainer(loader, model=model, args=training)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    losses = held_out_losses(model, held_out, collate)
    print(f"\n{'domain':<12} {'held-out loss':>13} {'final p':>8}")
    for d, p in zip(loader.domains, loader.mixer.proportions, strict=True):
        print(f"{d:<12} {losses[d]:>13.3f} {p:>8.3f}")
    odm.write_proportions_csv(loader.mixer, args.out / "proportions.csv")
    result: dict[str, Any] = {"held_out": losses, "proportions": dict(zip(loader.domains, loader.mixer.proportions))}
    try:
        title = f"{args.policy} on {', '.join(loader.domains)} (OnlineMixingTrainer)"
        result["plot"] = odm.plot_proportions(loader.mixer, args.out / "proportions.png", title=title)
        print(f"\nproportions over steps: {result['plot']} (table: {args.out / 'proportions.csv'})")
    except ImportError:
        print(f"\nproportions over steps: {args.out / 'proportions.csv'} (pip install matplotlib for the plot)")
    return result


if __name__ == "__main__":
    main()
