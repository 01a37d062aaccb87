"""The demo's floor: held-out cross entropy of count-based unigram and interpolated bigram models
fitted to a recipe's training split (the same tokens, split and held-out documents as its first
stage). A transformer whose eval loss is above the bigram's has not learned beyond bigram
statistics, where its depth cannot matter yet.

  python bench/demo_bigram.py configs/demo.yaml
"""

import sys

import numpy as np

from solarjax.data.pipeline import load_data
from solarjax.train.config import load_job
from solarjax.train.recipe import stage_train_config


def main(path: str) -> None:
    recipe = load_job(path)
    data = load_data(stage_train_config(recipe, recipe.stages[0]).data)
    docs = lambda packed: [packed.cache.doc(int(i)) for i in packed.doc_ids]
    train = [d for packed in data.sources.values() for d in docs(packed)]  # every source's, unweighted
    V = data.tokenizer.vocab_size
    pairs = np.concatenate([np.stack([d[:-1], d[1:]], 1) for d in train if len(d) > 1]).astype(np.int64)
    unigram = np.bincount(np.concatenate(train), minlength=V).astype(np.float64)
    p_unigram = (unigram + 0.01) / (unigram.sum() + 0.01 * V)  # add-0.01: unseen ids stay possible
    keys, counts = np.unique(pairs[:, 0] * V + pairs[:, 1], return_counts=True)
    print(f"{int(unigram.sum()):,} training tokens")
    sets = {name or "held-out": docs(packed) for name, packed in data.held_out.items()}
    if len(sets) > 1:
        sets["all held-out sets"] = [d for held in list(sets.values()) for d in held]
    for name, held in sets.items():
        held_out = np.concatenate([np.stack([d[:-1], d[1:]], 1) for d in held if len(d) > 1]).astype(np.int64)
        found = np.minimum(np.searchsorted(keys, held_out[:, 0] * V + held_out[:, 1]), len(keys) - 1)
        pair_counts = np.where(keys[found] == held_out[:, 0] * V + held_out[:, 1], counts[found], 0)
        context_counts = np.bincount(pairs[:, 0], minlength=V)[held_out[:, 0]]
        p_bigram = np.where(context_counts > 0, pair_counts / np.maximum(context_counts, 1), 0.0)
        print(f"{name}: {len(held_out):,} targets; unigram {-np.log(p_unigram[held_out[:, 1]]).mean():.4f} nats; "
              "bigram interpolated with the unigram at " + ", ".join(
                  f"{lam}: {-np.log(lam * p_bigram + (1 - lam) * p_unigram[held_out[:, 1]]).mean():.4f}"
                  for lam in (0.5, 0.7, 0.8, 0.9)))


if __name__ == "__main__":
    main(sys.argv[1])
