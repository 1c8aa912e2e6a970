"""The classifier's second scorer: character n-gram and word uni/bigram TF-IDF -> multinomial
logistic regression over the same classes as the fine-tuned MiniLM head (scikit-learn).

Why a second scorer: the MiniLM tokenizer lowercases and strips accents, so Vietnamese words
that differ only in their diacritics embed alike ("tự tử", suicide, becomes "tu tu", as do
"tủ", "từ", "tù": cabinet, word, prison), and a fine-tuned encoder is confidently wrong on
some benign look-alikes. Character n-grams see the diacritics and the
exact words; their mistakes are different ones, so the two are mixed (`classifier.py`: more
weight on the n-grams where the encoder loses the marks). Word uni- and bigrams beside the
character n-grams (within words, 2-5): a Vietnamese word is a syllable and many meanings live
in syllable pairs ("tự tử", "ma túy"). What each choice measured out of fold, and the variants
that did no better, are in docs/results.md.

Regularization C is picked by stratified k-fold CV on the fitting part only, scored by how well
P(not benign) ranks harmful above benign (ROC AUC), which is what the operating point uses.
Saved as JSON (vocabulary, settings) + safetensors (idf, weights): loading a pickle runs code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SETTINGS = {"char": {"analyzer": "char_wb", "ngram_range": (2, 5), "min_df": 2, "sublinear_tf": True, "lowercase": True},
            "word": {"analyzer": "word", "ngram_range": (1, 2), "min_df": 1, "sublinear_tf": True, "lowercase": True,
                     "token_pattern": r"(?u)\b\w+\b"}}  # one-letter words too (Vietnamese "ở", "ý")
C_GRID = (1.0, 4.0, 16.0, 64.0)


def _benign_auc(estimator, X, y) -> float:
    """ROC AUC of P(not benign) (class 0 is benign) for harmful vs benign."""
    from sklearn.metrics import roc_auc_score

    harmful = np.asarray(y) != 0
    if harmful.all() or not harmful.any():
        return 0.5
    return float(roc_auc_score(harmful, 1.0 - estimator.predict_proba(X)[:, 0]))


def _vectorizers(settings: dict, vocabularies: dict | None = None) -> list:
    """One TfidfVectorizer per named setting (fitted ones when `vocabularies` come from a file)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return [(name, TfidfVectorizer(**{**kw, "ngram_range": tuple(kw["ngram_range"])},
                                   vocabulary=vocabularies[name] if vocabularies else None))
            for name, kw in settings.items()]


class NgramScorer:
    def __init__(self, vectorizers: list, coef: np.ndarray, intercept: np.ndarray, meta: dict):
        """`vectorizers`: fitted (name, TfidfVectorizer) pairs whose features are stacked in order."""
        self.vectorizers, self.coef, self.intercept, self.meta = vectorizers, coef, intercept, meta

    @classmethod
    def fit(cls, parts: list[str], labels: list[int], n_classes: int, seed: int = 0) -> "NgramScorer":
        """Fit on texts with class indices 0..n_classes-1 (every class present)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import FeatureUnion, Pipeline

        y = np.asarray(labels)
        if sorted(set(y.tolist())) != list(range(n_classes)):
            raise ValueError(f"n-gram scorer: every class 0..{n_classes - 1} needs an example")
        folds = max(2, min(5, int(np.bincount(y).min())))
        pipe = Pipeline([("tfidf", FeatureUnion(_vectorizers(SETTINGS))),
                         ("lr", LogisticRegression(max_iter=3000, class_weight="balanced"))])
        search = GridSearchCV(pipe, {"lr__C": list(C_GRID)}, scoring=_benign_auc,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        search.fit(parts, y)
        best = search.best_estimator_
        lr = best.named_steps["lr"]
        vectorizers = best.named_steps["tfidf"].transformer_list
        meta = {"vectorizers": {name: {**kw, "ngram_range": list(kw["ngram_range"])} for name, kw in SETTINGS.items()},
                "C": float(search.best_params_["lr__C"]),
                "cv_auc": {str(c): round(float(s), 4) for c, s in zip(C_GRID, search.cv_results_["mean_test_score"])},
                "folds": folds, "features": {name: len(v.vocabulary_) for name, v in vectorizers}}
        coef, intercept = lr.coef_, lr.intercept_
        if n_classes == 2:  # scikit-learn keeps one row (class 1's logit); softmax over (0, it) is the same sigmoid
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        return cls(vectorizers, np.ascontiguousarray(coef, dtype=np.float32),
                   np.ascontiguousarray(intercept, dtype=np.float32), meta)

    def features(self, parts: list[str]):
        """[n, features] sparse TF-IDF, the vectorizers' columns side by side (as FeatureUnion)."""
        from scipy.sparse import hstack

        return hstack([v.transform(parts) for _, v in self.vectorizers]).tocsr()

    def probs(self, parts: list[str]) -> np.ndarray:
        """[n, classes] softmax probabilities."""
        from scipy.special import softmax

        logits = np.asarray(self.features(parts) @ self.coef.T + self.intercept, dtype=np.float64)
        return softmax(logits, axis=1).astype(np.float32)

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        vocab = {name: {term: int(i) for term, i in v.vocabulary_.items()} for name, v in self.vectorizers}
        (folder / "ngrams.json").write_text(json.dumps({**self.meta, "vocabularies": vocab}, ensure_ascii=False))
        # safetensors.numpy writes an array's bytes as laid out: a Fortran-ordered coef_ came back transposed
        tensors = {f"idf.{name}": v.idf_ for name, v in self.vectorizers} | {"coef": self.coef, "intercept": self.intercept}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "ngrams.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> "NgramScorer":
        from safetensors.numpy import load_file

        meta = json.loads((folder / "ngrams.json").read_text())
        tensors = load_file(str(folder / "ngrams.safetensors"))
        if "settings" in meta:  # saved by an older version: character n-grams only
            meta["vectorizers"], meta["vocabularies"] = {"char": meta.pop("settings")}, {"char": meta.pop("vocabulary")}
            tensors["idf.char"] = tensors.pop("idf")
        vectorizers = _vectorizers(meta["vectorizers"], meta.pop("vocabularies"))  # min_df applies to fitting only
        for name, v in vectorizers:
            v.idf_ = tensors[f"idf.{name}"]
        return cls(vectorizers, tensors["coef"], tensors["intercept"], meta)
