"""Token attributions for a tiny transformer classifier, trained here on generated sentences.

The data: sentences of 3-12 words drawn from filler words ("the", "movie", "plot", ...) and a few
sentiment words ("good", "great", ... / "bad", "awful", ...), labelled positive when they hold more
positive than negative words (ties are redrawn). A 2-layer BERT-style classifier (hidden 32,
random init from a config, no downloads) learns it in a few seconds. Then a padded batch of test
sentences of different lengths is explained in ONE ``torch.vmap`` call per method through
``fxattr.text`` (AttnLRP, DeepLIFT, the gradient family, attention methods), and the token heat
maps are drawn side by side (PNG and HTML). The sentiment
words should carry the relevance; the script prints the share of |relevance| they get.

    python examples/text_attribution.py            # about 20 s on 2 CPU cores
    python examples/text_attribution.py --quick    # fewer training steps (used by the tests)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.utils import logging as hf_logging

import fxattr
import fxattr.text

hf_logging.set_verbosity_error()

PAD, CLS = "[PAD]", "[CLS]"
POSITIVE = ["good", "great", "love", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "hate", "poor", "dull", "worse"]
FILLER = ["the", "a", "movie", "plot", "was", "is", "and", "it", "actors", "story", "film", "very",
          "quite", "this", "of", "ending"]
VOCAB = [PAD, CLS] + POSITIVE + NEGATIVE + FILLER
INDEX = {w: i for i, w in enumerate(VOCAB)}
SENTIMENT = torch.tensor([w in POSITIVE or w in NEGATIVE for w in VOCAB])


def make_sentences(n: int, max_words: int, generator: torch.Generator):
    """``n`` labelled sentences as right-padded ids ``(n, max_words + 1)`` ([CLS] first), masks, labels."""
    ids = torch.full((n, max_words + 1), INDEX[PAD])
    mask = torch.zeros_like(ids)
    labels = torch.zeros(n, dtype=torch.long)
    i = 0
    while i < n:
        length = int(torch.randint(3, max_words + 1, (), generator=generator))
        kind = torch.randint(0, 4, (length,), generator=generator)      # 1/4 positive, 1/4 negative
        pos = int((kind == 0).sum())
        neg = int((kind == 1).sum())
        if pos == neg:
            continue
        words = [POSITIVE[int(torch.randint(len(POSITIVE), (), generator=generator))] if k == 0 else
                 NEGATIVE[int(torch.randint(len(NEGATIVE), (), generator=generator))] if k == 1 else
                 FILLER[int(torch.randint(len(FILLER), (), generator=generator))] for k in kind.tolist()]
        ids[i, :length + 1] = torch.tensor([INDEX[CLS]] + [INDEX[w] for w in words])
        mask[i, :length + 1] = 1
        labels[i] = int(pos > neg)
        i += 1
    return ids, mask, labels


def make_model() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2, pad_token_id=INDEX[PAD],
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")      # eager: rollout reads the attention maps
    return BertForSequenceClassification(config)


def train(model, ids, mask, labels, *, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(ids), (batch_size,), generator=generator)
        out = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model.eval()


def explainers(f):
    """Each method through the text front door; every one maps a padded batch in one vmap call
    (AttnLRP and DeepLIFT capture the model once at the batch's length, a few seconds)."""
    return {
        "AttnLRP": fxattr.text.attribute(fxattr.lrp, f, composite="attnlrp"),
        "DeepLIFT (pad baseline)": fxattr.text.attribute(fxattr.deeplift, f, baseline="pad"),
        "gradient (L2 norm)": fxattr.text.attribute(fxattr.gradient, f, reduce="norm"),
        "gradient x input": fxattr.text.attribute(fxattr.input_x_gradient, f),
        "integrated gradients": fxattr.text.attribute(fxattr.integrated_gradients, f, steps=16, baseline="pad"),
        "SmoothGrad x input": fxattr.text.attribute(
            lambda g: fxattr.noise_tunnel(fxattr.input_x_gradient(g), samples=8, sigma=0.1), f),
        "attention rollout": fxattr.text.attribute(fxattr.text.attention_rollout, f),
        "attention relevance (Chefer)": fxattr.text.attribute(fxattr.text.attention_relevance, f),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "text_attribution.png"))
    parser.add_argument("--examples", type=int, default=4)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_set = make_sentences(2000, 12, generator)
    test_ids, test_mask, test_labels = make_sentences(500, 12, generator)
    model = make_model()
    start = time.perf_counter()
    train(model, *train_set, steps=120 if args.quick else 400)
    with torch.no_grad():
        predictions = model(input_ids=test_ids, attention_mask=test_mask).logits.argmax(-1)
    accuracy = (predictions == test_labels).float().mean().item()
    print(f"test accuracy {accuracy:.3f} after {time.perf_counter() - start:.1f} s of training")

    f, params = fxattr.text.functionalize(model)
    ids, mask, labels = test_ids[:args.examples], test_mask[:args.examples], test_labels[:args.examples]
    targets = fxattr.text.class_logit(labels)
    relevance, shares = {}, {}
    for name, explain in explainers(f).items():
        start = time.perf_counter()
        torch.manual_seed(1)
        r = torch.vmap(explain, in_dims=(None, 0, 0, 0), randomness="different")(params, ids, mask, targets)
        if name.startswith("attention"):
            # rows of [CLS]: its own entry is the identity / residual share, not evidence; hide it
            r = r.index_fill(1, torch.tensor([0]), 0.0)
        relevance[name] = r.detach()
        # the share of |relevance| on sentiment words, among the real words ([CLS] and padding left out)
        words = mask.bool().clone()
        words[:, 0] = False
        magnitude = r.detach().abs() * words
        shares[name] = (magnitude * SENTIMENT[ids]).sum().item() / max(magnitude.sum().item(), 1e-30)
        print(f"{name:30s} {1e3 * (time.perf_counter() - start):7.1f} ms for {len(ids)} sentences; "
              f"share of |relevance| on sentiment words {shares[name]:.2f}")

    panels = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        tokens = [VOCAB[t] for t in ids[i, :n].tolist()]
        for name, r in relevance.items():
            panels.append((f"sentence {i} ({['negative', 'positive'][int(labels[i])]}): {name}", tokens, r[i, :n]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fxattr.text.token_heatmap_png(panels, out)
    html = fxattr.text.token_heatmap_html([p[1] for p in panels], [p[2] for p in panels], labels=[p[0] for p in panels])
    out.with_suffix(".html").write_text(html)
    print(f"wrote {out} and {out.with_suffix('.html')}")
    return {"accuracy": accuracy, "relevance": relevance, "shares": shares, "mask": mask, "ids": ids}


if __name__ == "__main__":
    main()
