"""The classifier's second scorer: character n-gram TF-IDF -> multinomial logistic regression
over the same classes as the fine-tuned MiniLM head (scikit-learn; ~40 s with its CV here).

Why a second scorer: the MiniLM tokenizer lowercases and strips accents, so Vietnamese words
that differ only in their diacritics embed alike ("tự tử", suicide, becomes "tu tu", as do
"tủ", "từ", "tù": cabinet, word, prison), and a fine-tuned encoder is confidently wrong on
some benign look-alikes. Character n-grams see the diacritics and the
exact words; their mistakes are different ones, so the two are mixed (`classifier.py`: more
weight on the n-grams where the encoder loses the marks).

Regularization C is picked by stratified k-fold CV on the fitting part only, scored by how well
P(not benign) ranks harmful above benign (ROC AUC), which is what the operating point uses.
Saved as JSON (vocabulary, settings) + safetensors (idf, weights): loading a pickle runs code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SETTINGS = {"analyzer": "char_wb", "ngram_range": (2, 5), "min_df": 2, "sublinear_tf": True, "lowercase": True}
C_GRID = (1.0, 4.0, 16.0, 64.0)


def _benign_auc(estimator, X, y) -> float:
    """ROC AUC of P(not benign) (class 0 is benign) for harmful vs benign."""
    from sklearn.metrics import roc_auc_score

    harmful = np.asarray(y) != 0
    if harmful.all() or not harmful.any():
        return 0.5
    return float(roc_auc_score(harmful, 1.0 - estimator.predict_proba(X)[:, 0]))


class NgramScorer:
    def __init__(self, vectorizer, coef: np.ndarray, intercept: np.ndarray, meta: dict):
        self.vectorizer, self.coef, self.intercept, self.meta = vectorizer, coef, intercept, meta

    @classmethod
    def fit(cls, parts: list[str], labels: list[int], n_classes: int, seed: int = 0) -> "NgramScorer":
        """Fit on texts with class indices 0..n_classes-1 (every class present)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import Pipeline

        y = np.asarray(labels)
        if sorted(set(y.tolist())) != list(range(n_classes)):
            raise ValueError(f"n-gram scorer: every class 0..{n_classes - 1} needs an example")
        folds = max(2, min(5, int(np.bincount(y).min())))
        pipe = Pipeline([("tfidf", TfidfVectorizer(**SETTINGS)),
                         ("lr", LogisticRegression(max_iter=3000, class_weight="balanced"))])
        search = GridSearchCV(pipe, {"lr__C": list(C_GRID)}, scoring=_benign_auc,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        search.fit(parts, y)
        best = search.best_estimator_
        lr = best.named_steps["lr"]
        meta = {"settings": {**SETTINGS, "ngram_range": list(SETTINGS["ngram_range"])}, "C": float(search.best_params_["lr__C"]),
                "cv_auc": {str(c): round(float(s), 4) for c, s in zip(C_GRID, search.cv_results_["mean_test_score"])},
                "folds": folds, "features": len(best.named_steps["tfidf"].vocabulary_)}
        return cls(best.named_steps["tfidf"], np.ascontiguousarray(lr.coef_, dtype=np.float32),
                   np.ascontiguousarray(lr.intercept_, dtype=np.float32), meta)

    def probs(self, parts: list[str]) -> np.ndarray:
        """[n, classes] softmax probabilities."""
        from scipy.special import softmax

        logits = np.asarray(self.vectorizer.transform(parts) @ self.coef.T + self.intercept, dtype=np.float64)
        return softmax(logits, axis=1).astype(np.float32)

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        vocab = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        (folder / "ngrams.json").write_text(json.dumps({**self.meta, "vocabulary": vocab}, ensure_ascii=False))
        # safetensors.numpy writes an array's bytes as laid out: a Fortran-ordered coef_ came back transposed
        save_file({k: np.ascontiguousarray(v) for k, v in (("idf", self.vectorizer.idf_), ("coef", self.coef),
                                                         ("intercept", self.intercept))},
                  str(folder / "ngrams.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> "NgramScorer":
        from safetensors.numpy import load_file
        from sklearn.feature_extraction.text import TfidfVectorizer

        meta = json.loads((folder / "ngrams.json").read_text())
        vocab = meta.pop("vocabulary")
        settings = {**meta["settings"], "ngram_range": tuple(meta["settings"]["ngram_range"])}
        tensors = load_file(str(folder / "ngrams.safetensors"))
        vectorizer = TfidfVectorizer(**settings, vocabulary=vocab)  # min_df applies to fitting only
        vectorizer.idf_ = tensors["idf"]
        return cls(vectorizer, tensors["coef"], tensors["intercept"], meta)
