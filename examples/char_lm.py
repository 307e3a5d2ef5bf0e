"""A tiny character-level language model trained for a budget of optimizer steps on a stream.

The training data is a stream without a length (an `IterableDataset` of random windows of a
small built-in text, endless), so the run is budgeted in steps: `fit_one_cycle(steps=N,
valid_every=V)` trains N optimizer steps on a one-cycle schedule spread over them, validating
every V steps. It clips the gradients (`GradClipCB`), runs the forward pass in bfloat16 autocast
(`MixedPrecisionCB`, on the CPU too), accumulates gradients over 2 batches a step
(`GradAccumCB`), reports the validation perplexity (torchmetrics' `Perplexity`), and generates
text afterwards.

Run: `python examples/char_lm.py [--steps 600] [--valid-every 200]` (a few minutes on a laptop
CPU); the tests run it with `--steps 30 --valid-every 10`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.text import Perplexity

from learner import (
    DataLoaders,
    GradAccumCB,
    GradClipCB,
    Learner,
    MixedPrecisionCB,
    set_seed,
)

TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must
be in want of a wife. However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at
last? Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been
here, and she told me all about it. Mr. Bennet made no answer. Do you not want to know who has
taken it? cried his wife impatiently. You want to tell me, and I have no objection to hearing it.
This was invitation enough. Why, my dear, you must know, Mrs. Long says that Netherfield is taken
by a young man of large fortune from the north of England; that he came down on Monday in a
chaise and four to see the place, and was so much delighted with it, that he agreed with Mr.
Morris immediately; that he is to take possession before Michaelmas, and some of his servants
are to be in the house by the end of next week.
"""

VOCAB = sorted(set(TEXT))
STOI = {c: i for i, c in enumerate(VOCAB)}
DATA = torch.tensor([STOI[c] for c in TEXT])
SPLIT = int(0.9 * len(DATA))  # the last tenth is held out for validation


class Windows(IterableDataset):  # type: ignore[type-arg]
    """Endless random windows of the training text: `(chars, next chars)`, no length."""

    def __init__(self, data: torch.Tensor, seq_len: int, seed: int = 0) -> None:
        self.data, self.seq_len, self.seed = data, seq_len, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            i = int(torch.randint(len(self.data) - self.seq_len - 1, (1,), generator=g))
            chunk = self.data[i : i + self.seq_len + 1]
            yield chunk[:-1], chunk[1:]


def valid_windows(seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out text cut into windows: a fixed validation set."""
    held = DATA[SPLIT:]
    starts = range(0, len(held) - seq_len - 1, seq_len)
    return [(held[i : i + seq_len], held[i + 1 : i + seq_len + 1]) for i in starts]


class CharGRU(nn.Module):
    """Embedding, a GRU, and a linear head: logits `(batch, seq, vocab)`."""

    def __init__(self, vocab: int, emb: int = 32, hidden: int = 96) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


def loss_func(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of every next character, over batch and sequence."""
    return F.cross_entropy(preds.reshape(-1, preds.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def generate(model: nn.Module, prompt: str, n_chars: int, temperature: float = 0.8) -> str:
    """Sample `n_chars` characters after `prompt`, one at a time."""
    model.eval()
    ids = torch.tensor([[STOI[c] for c in prompt if c in STOI]])
    for _ in range(n_chars):
        logits = model(ids)[0, -1] / temperature
        ids = torch.cat([ids, torch.multinomial(F.softmax(logits, -1), 1)[None]], dim=1)
    return "".join(VOCAB[i] for i in ids[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--valid-every", type=int, default=200)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    set_seed(0)
    train = DataLoader(Windows(DATA[:SPLIT], args.seq_len), batch_size=args.bs)
    valid = DataLoader(valid_windows(args.seq_len), batch_size=args.bs)
    learn = Learner(
        CharGRU(len(VOCAB)),
        DataLoaders(train, valid),
        loss_func,
        metrics={"perplexity": Perplexity()},
        cbs=[GradAccumCB(2), MixedPrecisionCB(torch.bfloat16), GradClipCB(1.0)],
    )
    learn.fit_one_cycle(steps=args.steps, valid_every=args.valid_every, lr_max=args.lr)
    last = learn.recorder.history[-1]
    print(f"steps: {learn.global_step}")
    print(f"validations at steps: {[row['step'] for row in learn.recorder.history]}")
    print(f"vocabulary: {len(VOCAB)} characters")
    print(f"final validation loss: {last['valid_loss']:.4f}")
    print(f"final validation perplexity: {last['perplexity']:.4f}")
    print(f"generated: {generate(learn.model, 'It is ', 120)!r}")


if __name__ == "__main__":
    main()
