"""The retriever deployment: the passage index and the query embedder in one Ray Serve
replica, so the gateway stays light and retrieval scales on its own."""

from __future__ import annotations

from typing import Any


class Retriever:
    def __init__(self, index_dir: str):
        from serve.embedder import Embedder
        from serve.qa.index import PassageIndex

        self.index = PassageIndex.load(index_dir)
        self.embedder = Embedder()

    def search(self, question: str, k: int) -> list[dict[str, Any]]:
        vector = self.embedder.encode([question])[0]
        return [{**p.to_dict(), "score": round(score, 4)} for p, score in self.index.search(vector, k)]

    def passage(self, passage_id: int) -> dict[str, Any] | None:
        if 0 <= passage_id < len(self.index.passages):
            return self.index.passages[passage_id].to_dict()
        return None

    def check_health(self) -> None:
        self.embedder.encode(["health"])
