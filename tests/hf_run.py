"""The Hugging Face runs of tests/test_hf.py: a tiny BERT learning which sentences are positive.

Imported, it gives the task (`task()`: a word-level tokenizer trained here on an in-code corpus,
no download, and the tokenized sentences, built on first use) and its learners. Run as a script,
it resumes checkpoints in a new process: `python hf_run.py OUT CONFIG=CHECKPOINT ...` trains each
to the end with `fit(N_EPOCHS, resume_from=CHECKPOINT)` and saves the results of all in OUT.
"""

from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
)

from learner import DataLoaders, Learner, accuracy

N_EPOCHS = 4
N_TRAIN, N_VALID, BS = 312, 64, 16  # 20 training batches, the last of 8; 4 validation
POSITIVE = ("good", "great", "fun", "superb", "lovely", "excellent")
NEGATIVE = ("bad", "awful", "boring", "dull", "poor", "terrible")
NEUTRAL = ("the", "film", "plot", "acting", "was", "and", "a", "story", "cast", "music", "scene")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# Configurations: the training loader shuffles with its own generator ("gen"), or with torch's
# global RNG ("global"), which the dropout draws from too.
CONFIGS = ("gen", "global")


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` sentences of 2-9 neutral words around one sentiment word; label 1: it is positive."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(NEUTRAL, k=rng.randint(2, 9))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        out.append((" ".join(words), label))
    return out


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on this task's words, adding [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(POSITIVE + NEGATIVE + NEUTRAL)],
        trainers.WordLevelTrainer(special_tokens=SPECIALS),
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def encode(tokenizer: PreTrainedTokenizerFast, data: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{**tokenizer(text), "labels": label} for text, label in data]


@dataclass(frozen=True)
class Task:
    tokenizer: PreTrainedTokenizerFast
    train: list[dict[str, Any]]  # tokenized sentences with their "labels"
    valid: list[dict[str, Any]]


@functools.cache
def task() -> Task:
    """The tokenizer and the tokenized data, built once per process."""
    tokenizer = make_tokenizer()
    train = encode(tokenizer, sentences(N_TRAIN, seed=0))
    return Task(tokenizer, train, encode(tokenizer, sentences(N_VALID, seed=1)))


def make_dls(config: str = "gen") -> DataLoaders:
    """Padded per batch by `DataCollatorWithPadding`: the lengths vary within a batch."""
    t = task()
    collate = DataCollatorWithPadding(t.tokenizer)
    g = torch.Generator().manual_seed(2) if config == "gen" else None
    train = DataLoader(t.train, batch_size=BS, shuffle=True, collate_fn=collate, generator=g)
    return DataLoaders(train, DataLoader(t.valid, batch_size=BS, collate_fn=collate))


def make_model(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT of width 32 from a config (no pretrained weights), with its dropout."""
    config = BertConfig(
        vocab_size=task().tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def make_learner(config: str = "gen", seed: int = 0) -> Learner:
    """`Learner(model, dls, loss_func=None, metrics=accuracy)`, every random state seeded."""
    torch.manual_seed(seed)
    return Learner(make_model(seed), make_dls(config), loss_func=None, metrics=accuracy)


def results(learn: Learner) -> dict[str, Any]:
    """What a run is compared by: every batch's loss, the results table, the weights."""
    return {
        "losses": list(learn.recorder.losses),
        "history": [dict(row) for row in learn.recorder.history],
        "weights": {k: v.clone() for k, v in learn.model.state_dict().items()},
    }


def main(out: str, jobs: list[str]) -> None:
    done = {}
    for job in jobs:
        config, path = job.split("=", 1)
        learn = make_learner(config, seed=1)  # other weights: the checkpoint must replace them
        learn.fit(N_EPOCHS, resume_from=path)
        done[job] = results(learn)
    torch.save(done, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
