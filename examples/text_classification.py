"""Train a tiny BERT to tell good reviews from bad ones with the Learner, downloading nothing.

A Hugging Face model needs no glue: its tokenizer's output, padded per batch by
`DataCollatorWithPadding`, comes as dicts that the Learner splits by name; with `loss_func=None`
the model computes its own loss from `labels`, and the metrics and predictions see its logits.
Here the reviews are generated from a few word lists (the label depends on the words), a
word-level tokenizer is trained on them with `tokenizers`, and the BERT is built from a small
config with random weights. It trains in a few seconds on a CPU, prints the results table and
the final validation accuracy, then classifies sentences it has not seen with `learn.infer`.

Needs transformers and tokenizers: `pip install -e ".[text]"`.

Run from the repository root:
    python examples/text_classification.py
    python examples/text_classification.py --epochs 1 --n-train 500   # a quick look
    python examples/text_classification.py --help
"""

from __future__ import annotations

import argparse
import random
import sys

try:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        PreTrainedTokenizerFast,
    )
except ImportError as e:
    sys.exit(f"This example needs transformers and tokenizers ({e}): pip install -e '.[text]'")

import torch
from torch.utils.data import DataLoader

from learner import DataLoaders, Learner, accuracy

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--epochs", type=int, default=3, help="number of epochs (default: 3)")
parser.add_argument("--n-train", type=int, default=2000, help="training reviews (default: 2000)")
parser.add_argument("--n-valid", type=int, default=500, help="validation reviews (default: 500)")
parser.add_argument("--bs", type=int, default=32, help="batch size (default: 32)")
parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of AdamW (default: 3e-3)")
parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
args = parser.parse_args()
torch.manual_seed(args.seed)

# -- data: reviews of 3 to 12 words, positive or negative by their adjectives and a "not" -------
GOOD = ["good", "great", "superb", "lovely", "moving", "brilliant", "funny", "gripping"]
BAD = ["bad", "awful", "boring", "dull", "clumsy", "tedious", "silly", "forgettable"]
SUBJECTS = ["the film", "the plot", "the acting", "this story", "the cast", "the music",
            "the ending", "every scene", "the script", "the director's work"]  # fmt: skip
ADVERBS = ["", "", "really", "quite", "truly", "rather", "so", "just"]
TAILS = ["", "", "from start to finish", "if you ask me", "for a sequel", "all the way through",
         "on the big screen", "as i expected"]  # fmt: skip


def review(rng: random.Random) -> tuple[str, int]:
    """One review and its label (1: positive): one or two adjectives of the same side, and in a
    third of the reviews a "not" that turns them around."""
    good, negated = rng.random() < 0.5, rng.random() < 1 / 3
    adjectives = rng.sample(GOOD if good else BAD, k=rng.randint(1, 2))
    words = [rng.choice(SUBJECTS), "was", "not" if negated else rng.choice(ADVERBS),
             " and ".join(adjectives), rng.choice(TAILS)]  # fmt: skip
    return " ".join(w for w in words if w), int(good != negated)


rng = random.Random(args.seed)
train_reviews = [review(rng) for _ in range(args.n_train)]
valid_reviews = [review(rng) for _ in range(args.n_valid)]
print(f"{len(train_reviews)} training and {len(valid_reviews)} validation reviews, e.g. "
      f"{train_reviews[0]}")  # fmt: skip

# -- a word-level tokenizer trained on the training reviews; it adds [CLS] ... [SEP] -------------
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(
    [text for text, _ in train_reviews], trainers.WordLevelTrainer(special_tokens=SPECIALS)
)
tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
    sep_token="[SEP]",
)  # fmt: skip


def encode(reviews: list[tuple[str, int]]) -> list[dict[str, object]]:
    return [{**tokenizer(text), "labels": label} for text, label in reviews]


# The collator pads each batch to its longest review and stacks the labels: dicts of tensors.
collate = DataCollatorWithPadding(tokenizer)
dls = DataLoaders(
    DataLoader(encode(train_reviews), batch_size=args.bs, shuffle=True, collate_fn=collate),
    DataLoader(encode(valid_reviews), batch_size=2 * args.bs, collate_fn=collate),
)

# -- model: a 2-layer BERT of width 64 from a config, random weights ------------------------------
config = BertConfig(
    vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=32, num_labels=2,
)  # fmt: skip
model = BertForSequenceClassification(config)
print(f"BERT with {sum(p.numel() for p in model.parameters()):,} parameters")

# -- train: no loss function, the model's own loss from the batch's labels ------------------------
learn = Learner(model, dls, loss_func=None, metrics=accuracy, lr=args.lr)
learn.fit(args.epochs)
acc = learn.recorder.history[-1]["accuracy"]
print(f"final validation accuracy: {acc:.4f} (epochs={args.epochs}, n_train={args.n_train})")

# -- new sentences: infer takes the tokenizer's output and returns the logits ---------------------
for text in ["the music was truly gripping", "the ending was not funny if you ask me"]:
    logits = learn.infer(tokenizer(text, return_tensors="pt"))  # (1, 2)
    p_good = logits.softmax(-1)[0, 1].item()
    print(f"{text!r}: {'positive' if p_good > 0.5 else 'negative'} (p={p_good:.3f})")
