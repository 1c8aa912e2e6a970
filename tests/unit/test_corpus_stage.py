"""Text normalization of the `data` stage: Vietnamese stays composed, mojibake is repaired, layout is cleaned."""

from __future__ import annotations

import unicodedata


from data_jobs.documents import normalize_text

VIETNAMESE = "Tiếng Việt: người, đường, nghiêng, Hà Nội."


def test_normalize_keeps_vietnamese_composed_repairs_mojibake_and_cleans_layout():
    decomposed = unicodedata.normalize("NFD", VIETNAMESE)
    assert decomposed != VIETNAMESE and normalize_text(decomposed) == VIETNAMESE
    assert normalize_text("a\x00b\x1bc\r\nd  \n\n\n\ne\x85") == "abc\nd\n\ne"
    assert normalize_text("The cafÃ© serves crÃ¨me brÃ»lÃ©e") == "The café serves crème brûlée"
    assert normalize_text("“curly” quotes and ﬁ ligature stay") == "“curly” quotes and ﬁ ligature stay"


